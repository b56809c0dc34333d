"""Memory vs time of DiT weight offloading (memory issue), Wan2.1-I2V-14B, 480x832x81, CFG, random bf16 weights,
and the peak memory of tiled VAE decoding at 720x1280x81.

Modes run in one process on the same weights and inputs: no offload, block, phase (lazy_load in a child process,
so that its host RSS is measured from a clean baseline). A step is two forwards (cond, uncond), as with offload
the branches run one after the other; the no-offload row runs the same way. One warm-up step, mean of 2.
Two more no-offload rows time the attention settings (``WanDiT.set_attention_chunks``): the I2V cross-attention
over whole sequences (as before query chunking) and the lean self-attention (head groups). After the timed steps
of a row, one more forward measures the peak per stage (embeddings, self-attention, cross-attention, FFN, head;
the allocator's counters are host-side, so the hooks need no synchronisation).

    python bench/bench_offload.py [--parts dit lazy vae]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from real_size import build_dit, build_vae, gib

from lightx2v.hooks.offload import OffloadConfig, apply_offload

PRESET = "wan2.1-i2v-14b"


def inputs(cfg):
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, cfg.in_dim, 21, 60, 104, device="cuda", generator=g)
    ctx = torch.randn(1, 512, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
    ctx[:, 24:] = 0
    null = torch.zeros_like(ctx)
    clip = torch.randn(1, 257, 1280, device="cuda", generator=g, dtype=torch.bfloat16)
    return x, torch.tensor([700.0], device="cuda"), ctx, null, clip


@torch.inference_mode()
def time_steps(dit, inp, steps=2):
    x, t, ctx, null, clip = inp
    dit(x, t, ctx, clip), dit(x, t, null, clip)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        out = dit(x, t, ctx, clip)
        dit(x, t, null, clip)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps, gib(torch.cuda.max_memory_allocated()), out


@torch.inference_mode()
def stage_peaks(dit, inp) -> dict[str, float]:
    """One forward; the peak allocated GiB of each stage (the block stages: the max over the blocks)."""
    x, t, ctx, _, clip = inp
    peaks: dict[str, float] = {}
    current: list[str | None] = [None]

    def enter(name):
        if current[0] is not None:
            peaks[current[0]] = max(peaks.get(current[0], 0.0), gib(torch.cuda.max_memory_allocated()))
        torch.cuda.reset_peak_memory_stats()
        current[0] = name

    # Registered after the offload hooks: a unit is made resident before its stage starts here.
    hooks = [dit.register_forward_pre_hook(lambda m, a: enter("embeddings")),
             dit.register_forward_hook(lambda m, a, o: enter(None)),
             dit.blocks[-1].register_forward_hook(lambda m, a, o: enter("head"))]
    for b in dit.blocks:
        hooks += [b.self_attn.register_forward_pre_hook(lambda m, a: enter("self-attn")),
                  b.norm3.register_forward_pre_hook(lambda m, a: enter("cross-attn")),
                  b.cross_attn.register_forward_hook(lambda m, a, o: enter("ffn"))]
    torch.cuda.synchronize()
    dit(x, t, ctx, clip)
    torch.cuda.synchronize()
    for h in hooks:
        h.remove()
    return {k: round(v, 2) for k, v in peaks.items()}


def rel_l2(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def part_dit(rows):
    dit = build_dit(PRESET)
    inp = inputs(dit.cfg)
    base_s, base_mem, ref = time_steps(dit, inp)
    rows.append({"mode": "none", "s/step": base_s, "ratio": 1.0, "peak GiB": base_mem, "exact": "-"})
    print(rows[-1], "| stages:", stage_peaks(dit, inp), flush=True)
    # Attention settings without offload: the cross-attention over whole sequences, the lean self-attention.
    for name, kw in (("none, cross-attn unchunked", dict(query_tokens=None)),
                     ("none, lean self-attn (head_group 8)", dict(head_group=8))):
        dit.set_attention_chunks(**kw)
        s, mem, out = time_steps(dit, inp)
        rows.append({"mode": name, "s/step": s, "ratio": s / base_s, "peak GiB": mem,
                     "exact": bool(torch.equal(out, ref)), "rel L2 vs none": rel_l2(out, ref)})
        print(rows[-1], "| stages:", stage_peaks(dit, inp), flush=True)
        dit.set_attention_chunks()
    for gran in ("block", "phase"):
        dit.cpu()
        gc.collect(), torch.cuda.empty_cache()
        handle = apply_offload(dit, OffloadConfig(cpu_offload=True, offload_granularity=gran), torch.device("cuda"))
        with handle.resident():
            s, mem, out = time_steps(dit, inp)
            st = handle.stats()
            stages = stage_peaks(dit, inp)
        rows.append({"mode": gran, "s/step": s, "ratio": s / base_s, "peak GiB": mem,
                     "exact": bool(torch.equal(out, ref)), "GB copied/step": st.bytes_h2d / 1e9 / 3,
                     "slots GiB": gib(st.slot_bytes), "resident weights GiB": gib(st.resident_bytes)})
        print(rows[-1], "| stages:", stages, flush=True)
        handle.remove()
    dit.cpu()
    return dit, base_s


def part_lazy(rows, dit, base_s):
    """Write the checkpoint, then measure lazy_load + block offload in a child process."""
    from lightx2v.models.wan.checkpoint import save_dit

    folder = Path(tempfile.mkdtemp(prefix="lazy-", dir=os.environ.get("BENCH_DISK", "/tmp")))
    t0 = time.perf_counter()
    save_dit(dit.state_dict(), dit.cfg, folder, "wan")
    print(f"wrote the 14B checkpoint in {time.perf_counter() - t0:.0f} s", flush=True)
    del dit
    gc.collect(), torch.cuda.empty_cache()
    out = subprocess.run([sys.executable, __file__, "--lazy_child", str(folder)], capture_output=True, text=True)
    print(out.stderr[-2000:], flush=True)
    child = json.loads(out.stdout.strip().splitlines()[-1])
    rows.append({"mode": "block + lazy_load", "s/step": child["s/step"], "ratio": child["s/step"] / base_s,
                 "peak GiB": child["peak GiB"], "exact": "-", "host RSS above baseline GiB": child["rss GiB"]})
    print(rows[-1], flush=True)


def lazy_child(folder: str):
    from lightx2v.models.wan.checkpoint import dit_lazy_tensors, load_dit_without_blocks
    from lightx2v.ops.attention import get_attention_backend

    torch.cuda.init()
    torch.empty(1, device="cuda")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    attn = get_attention_backend("torch_sdpa", dtype=torch.bfloat16, head_dim=128, device=torch.device("cuda"))
    dit = load_dit_without_blocks(folder, "wan", attn=attn, device="cuda", dtype=torch.bfloat16)
    handle = apply_offload(dit, OffloadConfig(cpu_offload=True, offload_granularity="block", lazy_load=True),
                           torch.device("cuda"), weights_source=dit_lazy_tensors(folder, "wan"))
    with handle.resident():
        s, mem, _ = time_steps(dit, inputs(dit.cfg))
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2**20
    print(json.dumps({"s/step": s, "peak GiB": mem, "rss GiB": rss}))


@torch.inference_mode()
def part_vae(rows):
    from lightx2v.models.wan.vae import TilingConfig

    vae = build_vae()
    z = torch.randn(1, 16, 21, 90, 160, device="cuda", dtype=torch.bfloat16)
    for name, tiling in (("tiled", TilingConfig()), ("untiled", None)):
        gc.collect(), torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        vae.decode(z, tiling=tiling)
        torch.cuda.synchronize()
        rows.append({"VAE decode 81x720x1280": name, "s": time.perf_counter() - t0,
                     "peak GiB": gib(torch.cuda.max_memory_allocated()), "weights+input GiB": gib(base)})
        print(rows[-1], flush=True)


def table(rows):
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols)
              + " |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", nargs="+", default=["dit", "lazy", "vae"])
    ap.add_argument("--lazy_child", default=None)
    args = ap.parse_args()
    if args.lazy_child:
        return lazy_child(args.lazy_child)
    print(f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__}", flush=True)
    if "dit" in args.parts:
        rows = []
        dit, base_s = part_dit(rows)
        if "lazy" in args.parts:
            part_lazy(rows, dit, base_s)
        del dit
        gc.collect(), torch.cuda.empty_cache()
        table(rows)
    if "vae" in args.parts:
        rows = []
        part_vae(rows)
        table(rows)


if __name__ == "__main__":
    main()
