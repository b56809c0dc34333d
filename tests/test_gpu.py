"""GPU checks (marked `gpu`, skipped without CUDA): bf16 on the GPU against float32 on the CPU, determinism."""

import pytest
import torch

from lightx2v import LightX2VPipeline

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_tiny_pipeline_bf16_gpu_close_to_fp32_cpu_and_deterministic():
    kw = dict(height=64, width=64, num_frames=9, infer_steps=8)
    gpu = LightX2VPipeline().create_generator(device="cuda", **kw)
    assert gpu.runner.dtype == torch.bfloat16
    a = gpu.generate(seed=3, prompt="a cat", return_result_tensor=True, progress=False)["video"]
    b = gpu.generate(seed=3, prompt="a cat", return_result_tensor=True, progress=False)["video"]
    assert torch.equal(a, b)  # same seed, same device: same video
    cpu = LightX2VPipeline().create_generator(device="cpu", **kw)
    ref = cpu.generate(seed=3, prompt="a cat", return_result_tensor=True, progress=False)["video"]
    other = cpu.generate(seed=4, prompt="a cat", return_result_tensor=True, progress=False)["video"]
    assert _rel(a, ref) < 0.05 < _rel(other, ref)


def test_dit_and_vae_bf16_match_fp32():
    from lightx2v.models.wan.tiny import ensure_tiny_model
    from lightx2v.models.wan.checkpoint import load_dit
    from lightx2v.models.wan.vae import load_wan_vae
    from lightx2v.ops.attention import get_attention_backend

    root = ensure_tiny_model()
    dev = torch.device("cuda")
    dit32 = load_dit(root, "wan", attn=get_attention_backend("torch_sdpa", dtype=torch.float32, head_dim=16,
                                                             device=dev), device=dev, dtype=torch.float32)
    dit16 = load_dit(root, "wan", attn=get_attention_backend("torch_sdpa", dtype=torch.bfloat16, head_dim=16,
                                                             device=dev), device=dev, dtype=torch.bfloat16)
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, 16, 5, 16, 16, device=dev, generator=g)
    ctx = torch.randn(1, 512, 32, device=dev, generator=g)
    ctx[:, 9:] = 0
    t = torch.tensor([500.0], device=dev)
    with torch.inference_mode():
        assert _rel(dit16(x, t, ctx), dit32(x, t, ctx)) < 3e-2
        vae32 = load_wan_vae(root / "Wan2.1_VAE.pth", device=dev, dtype=torch.float32)
        vae16 = load_wan_vae(root / "Wan2.1_VAE.pth", device=dev, dtype=torch.bfloat16)
        z = torch.randn(1, 16, 3, 8, 8, device=dev, generator=g)
        assert _rel(vae16.decode(z), vae32.decode(z)) < 5e-2


def test_fused_affine_layer_norm_matches_float32_math():
    from lightx2v.models.wan.dit import AffineLayerNorm, layer_norm_f32

    norm = AffineLayerNorm(5120, 1e-6).cuda()
    with torch.no_grad():
        norm.weight.normal_(1, 0.1)
        norm.bias.normal_(0, 0.1)
    x = (torch.randn(1, 4096, 5120, device="cuda") + 0.3).to(torch.bfloat16)
    with torch.no_grad():
        want = layer_norm_f32(x, 1e-6, norm.weight, norm.bias).to(torch.bfloat16)
        assert _rel(norm(x), want) < 5e-3
