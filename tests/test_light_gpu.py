"""GPU checks (marked `gpu`, skipped without CUDA) of RIFE and the TAE in half precision: close to float32 on the
CPU, the originals kept exactly, memory bounded by the batch / time chunk."""

import pytest
import torch

from lightx2v.models.rife import IFNet, interpolate
from lightx2v.models.wan.tae import TAEConfig, TinyAutoencoder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _ifnet():
    torch.manual_seed(0)
    net = IFNet().eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("beta"):
                p.uniform_(0.5, 1.5)
    return net


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rife_half_on_gpu_close_to_fp32_cpu(dtype):
    net = _ifnet()
    frames = torch.rand(5, 240, 416, 3, generator=torch.Generator().manual_seed(1))
    ref, _ = interpolate(frames, 16, 32, net)
    out, fps = interpolate(frames, 16, 32, net.to("cuda", dtype), batch_size=3)
    assert fps == 32 and out.device.type == "cpu" and out.shape == ref.shape
    assert torch.equal(out[0::2], frames)
    assert (out - ref).abs().mean().item() < 0.01
    # frames already on the GPU stay there
    on_gpu, _ = interpolate(frames.cuda(), 16, 32, net, batch_size=3)
    assert on_gpu.device.type == "cuda" and (on_gpu.cpu() - out).abs().max().item() < 1e-3


def test_rife_memory_is_bounded_by_the_batch():
    net = _ifnet().to("cuda", torch.bfloat16)
    peaks = []
    for n in (9, 33):  # 4x the frames: the same peak (the output lives on the CPU)
        frames = torch.rand(n, 480, 832, 3)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        interpolate(frames, 16, 32, net, batch_size=4)
        peaks.append(torch.cuda.max_memory_allocated() - base)
    assert peaks[1] < 1.1 * peaks[0], peaks


def test_tae_bf16_on_gpu_close_to_fp32_cpu():
    torch.manual_seed(0)
    tae = TinyAutoencoder(TAEConfig()).eval()
    z = torch.randn(1, 16, 5, 30, 52, generator=torch.Generator().manual_seed(2))
    ref = tae.decode(z)
    out = tae.to("cuda", torch.bfloat16).decode(z.cuda())
    assert out.shape == ref.shape == (1, 3, 17, 240, 416)
    assert (out.float().cpu() - ref).abs().mean().item() < 0.02
    assert torch.equal(tae.decode(z.cuda(), time_chunk=1), tae.decode(z.cuda(), time_chunk=1))  # deterministic
