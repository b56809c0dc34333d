"""Per-step time of the Wan2.1 DiT in each speed mode against diffusers, in one process (speed issue).

Modes: bf16 + torch_sdpa, bf16 + sage_attn, fp8 + sage_attn, int8 + sage_attn, each eager and with regional
torch.compile; diffusers' WanTransformer3DModel eager as the reference. Same random weights (a rebuilt model with the
same seed has the same weights) and inputs. A step is CFG: ours as one batch of 2 (our runner's default on GPU),
diffusers as two forwards (its pipeline). Accuracy: relative L2 of each mode's output against ours bf16 + SDPA.

    python bench/bench_speed.py --models 14b-i2v 1.3b --steps 2
    python bench/bench_speed.py --models 14b-i2v --no_compile --profile   # + where each mode's step time goes

``--profile`` runs one more step of each eager mode under torch.profiler and prints its GPU time by kind of kernel
(GEMMs, attention, our fused Triton kernels, activation quantization, other PyTorch kernels).
"""

from __future__ import annotations

import argparse
import gc
import re
import time

import torch

from real_size import build_dit

from lightx2v.models.wan.checkpoint import dit_key_to_diffusers

MODELS = {"1.3b": "wan2.1-t2v-1.3b", "14b-i2v": "wan2.1-i2v-14b"}
FP32_MODULES = re.compile(r"(time_embedder|scale_shift_table|norm1|norm2|norm3)")


def inputs(cfg):
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, cfg.in_dim, 21, 60, 104, device="cuda", generator=g)
    ctx = torch.randn(2, 512, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
    ctx[0, 24:], ctx[1, 8:] = 0, 0
    clip = torch.randn(1, 257, 1280, device="cuda", generator=g, dtype=torch.bfloat16) if cfg.has_image_input \
        else None
    return x, torch.tensor([700.0], device="cuda"), ctx, clip


def ours_step(dit, inp):
    x, t, ctx, clip = inp
    clip2 = None if clip is None else torch.cat([clip, clip])
    return lambda: dit(torch.cat([x, x]), t.expand(2), ctx, clip2)


def diffusers_model(dit):
    """diffusers' model on the same weights (renamed, shared where dtypes agree)."""
    import diffusers

    kwargs = {k: v for k, v in dit.cfg.to_diffusers_config().items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = diffusers.WanTransformer3DModel(**kwargs)
    sd = {dit_key_to_diffusers(k): v for k, v in dit.state_dict().items()}
    sd = {k: v.float() if FP32_MODULES.search(k) else v.to(torch.bfloat16) for k, v in sd.items()}
    ref.load_state_dict(sd, assign=True, strict=True)
    with torch.device("cuda"):  # rope buffers are not in the state dict: rebuild them
        ref.rope = type(ref.rope)(kwargs["attention_head_dim"], kwargs["patch_size"], kwargs["rope_max_seq_len"])
    return ref.eval()


def diffusers_step(ref, inp):
    x, t, ctx, clip = inp

    def step():
        a = ref(x.to(torch.bfloat16), t, ctx[:1], encoder_hidden_states_image=clip, return_dict=False)[0]
        ref(x.to(torch.bfloat16), t, ctx[1:], encoder_hidden_states_image=clip, return_dict=False)
        return a
    return step


@torch.inference_mode()
def timed(fn, steps):
    out = fn()  # warm-up (and compilation)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps, out


# kernel name -> kind, first match wins (CUDA kernel names as the profiler reports them)
KINDS = (
    ("attention", re.compile(r"sage_attn_fwd|sage_quant|sage_kv|flash|fmha|cudnn|attention", re.I)),
    ("activation quant", re.compile(r"act_quant", re.I)),
    ("GEMM", re.compile(r"gemm|int8_mm|xmma|cutlass|nvjet|sm90|_mm_|matmul", re.I)),
    ("fused Triton (norm/rope/residual)", re.compile(r"norm_modulate|gated_residual|rms_norm|rope", re.I)),
)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other PyTorch kernels"


@torch.inference_mode()
def profile(fn) -> dict:
    """GPU milliseconds of one step by kind of kernel, and the step's wall time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    by_kind: dict[str, float] = {}
    top: dict[str, float] = {}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if us <= 0 or ev.key.startswith("ProfilerStep"):
            continue
        by_kind[kind_of(ev.key)] = by_kind.get(kind_of(ev.key), 0.0) + us / 1e3
        top[ev.key] = top.get(ev.key, 0.0) + us / 1e3
    busiest = sorted(top.items(), key=lambda kv: -kv[1])[:6]
    return {"wall ms": wall * 1e3, "kinds": by_kind, "top": busiest}


def rel(a, b):
    a, b = a.float()[:1], b.float()[:1]
    return ((a - b).norm() / b.norm()).item()


def run(key, steps, compile_modes, rows, quants=("bf16", "fp8", "int8"), profiles=None, modes=None,
        cross_attn=None):
    """``modes``: explicit (quant, self-attention backend) pairs, e.g. [("fp8", "flash_attn3_fp8")], instead of the
    default grid; ``cross_attn``: the cross-attention backend (default: the self-attention's)."""
    from lightx2v.hooks.compile import apply_compile, remove_compile
    from lightx2v.ops.attention import get_attention_backend
    from lightx2v.ops.quant import apply_quantization

    preset = MODELS[key]
    dit = build_dit(preset)
    inp = inputs(dit.cfg)
    ref = diffusers_model(dit)
    d_s, d_out = timed(diffusers_step(ref, inp), steps)
    del ref
    gc.collect(), torch.cuda.empty_cache()
    base = None

    def record(mode, compiled):
        nonlocal base
        if compiled:
            apply_compile(dit)
        torch.cuda.reset_peak_memory_stats()
        try:
            s, out = timed(ours_step(dit, inp), steps)
        except Exception as e:  # report and go on
            rows.append({"model": preset, "mode": mode + (" + compile" if compiled else ""), "error": repr(e)[:120]})
            print(rows[-1], flush=True)
            return
        finally:
            if compiled:
                remove_compile(dit)
        base = out if base is None else base
        if profiles is not None and not compiled:
            profiles[mode] = profile(ours_step(dit, inp))
        rows.append({"model": preset, "mode": mode + (" + compile" if compiled else ""), "s/step": s,
                     "vs diffusers": s / d_s, "rel L2 vs bf16 exact": rel(out, base),
                     "peak GiB": torch.cuda.max_memory_allocated() / 2**30})
        print(rows[-1], flush=True)

    rows.append({"model": preset, "mode": "diffusers eager (2 forwards)", "s/step": d_s, "vs diffusers": 1.0})
    print(rows[-1], flush=True)

    def set_attention(name):
        def backend(n):
            return get_attention_backend(n, dtype=torch.bfloat16, head_dim=dit.cfg.head_dim,
                                         device=torch.device("cuda"))

        self_b, cross_b = backend(name), backend(cross_attn or name)
        for block in dit.blocks:
            block.self_attn.attn = self_b
            block.cross_attn.attn = block.cross_attn.image_attn = cross_b

    grid = modes or [(q, a) for q in quants for a in (["torch_sdpa", "sage_attn"] if q == "bf16" else ["sage_attn"])]
    current = "bf16"
    for quant, attn in grid:
        quant = None if quant == "bf16" else quant
        if (quant or "bf16") != current:
            del dit
            gc.collect(), torch.cuda.empty_cache()
            dit = build_dit(preset) if quant is None else apply_quantization(build_dit(preset), quant)
            current = quant or "bf16"
            gc.collect(), torch.cuda.empty_cache()
        for attn in [attn]:
            try:
                set_attention(attn)
            except Exception as e:
                rows.append({"model": preset, "mode": f"{quant or 'bf16'} + {attn}", "error": str(e)[:120]})
                continue
            for compiled in compile_modes:
                record(f"{quant or 'bf16'} + {attn}", compiled)
    del dit
    gc.collect(), torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["14b-i2v", "1.3b"], choices=list(MODELS))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--no_compile", action="store_true")
    ap.add_argument("--quant", nargs="+", default=["bf16", "fp8", "int8"], choices=["bf16", "fp8", "int8"])
    ap.add_argument("--profile", action="store_true", help="GPU time by kind of kernel for each eager mode")
    ap.add_argument("--modes", nargs="+", default=None, metavar="QUANT:ATTN",
                    help="explicit modes, e.g. bf16:torch_sdpa fp8:flash_attn3_fp8 int8:sage_attn")
    ap.add_argument("--cross_attn", default=None, help="cross-attention backend (default: the mode's)")
    args = ap.parse_args()
    modes = [tuple(m.split(":", 1)) for m in args.modes] if args.modes else None
    import diffusers

    print(f"GPU {torch.cuda.get_device_name()} | torch {torch.__version__} | diffusers {diffusers.__version__} | "
          "480x832x81, CFG", flush=True)
    rows, profiles = [], ({} if args.profile else None)
    for key in args.models:
        run(key, args.steps, [False] if args.no_compile else [False, True], rows, args.quant, profiles, modes,
            args.cross_attn)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols)
              + " |")
    if profiles:
        kinds = list(dict.fromkeys(k for p in profiles.values() for k in p["kinds"]))
        print("\nGPU ms per CFG step (one batch of 2) by kind of kernel (torch.profiler)\n")
        print("| mode | step wall ms | " + " | ".join(kinds) + " |\n|" + "---|" * (len(kinds) + 2))
        for mode, p in profiles.items():
            print(f"| {mode} | {p['wall ms']:.0f} | " + " | ".join(f"{p['kinds'].get(k, 0):.0f}" for k in kinds) + " |")
        for mode, p in profiles.items():
            print(f"\n{mode}: busiest kernels: " + "; ".join(f"{n[:70]} {ms:.0f} ms" for n, ms in p["top"]))


if __name__ == "__main__":
    main()
