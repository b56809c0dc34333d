"""Z-Image on a CUDA GPU (marked `gpu`, skipped without CUDA): bf16 generations of the tiny model against float32 on
the CPU and against diffusers' ZImagePipeline in bf16 on the same GPU; determinism."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_tiny_z_image_bf16_gpu(tmp_path):
    import diffusers

    from lightx2v.models.z_image.stages import ZImageRequest, generate
    from lightx2v.models.z_image.tiny import TINY_ASPECT_RATIOS, ensure_tiny_model

    root = ensure_tiny_model(tmp_path)
    req = ZImageRequest(prompt="a red cat", seed=3, aspect_ratios=TINY_ASPECT_RATIOS)
    a = generate(root, req, device="cuda", dtype=torch.bfloat16)
    b = generate(root, req, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(a, b)  # same seed, same device: same image
    ref32 = generate(root, req)
    other = generate(root, ZImageRequest(**{**req.__dict__, "seed": 4}))
    assert _rel(a, ref32) < 0.05 < _rel(other, ref32)

    pipe = diffusers.ZImagePipeline.from_pretrained(str(root), torch_dtype=torch.bfloat16).to("cuda")
    w, h = TINY_ASPECT_RATIOS[req.aspect_ratio]
    want = pipe(req.prompt, height=h, width=w, num_inference_steps=req.infer_steps, guidance_scale=0.0,
                generator=torch.Generator("cpu").manual_seed(req.seed), output_type="pt").images
    want = want.permute(0, 2, 3, 1).float().cpu()
    assert _rel(a, want) < 0.05
