"""LoRA on the tiny Wan DiT (CPU, float32): every key layout, merge vs dynamic, switching, removal, strictness and
the dequantize -> merge -> requantize path."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from lightx2v.errors import CheckpointError, UserError
from lightx2v.hooks.lora import (
    LoRAConfig, LoRASpec, apply_lora, dequantize_weight, load_lora, quantize_weight,
)
from lightx2v.models.wan.arch import PRESETS
from lightx2v.models.wan.checkpoint import dit_key_to_diffusers
from lightx2v.models.wan.dit import WanDiT
from lightx2v.ops.attention import get_attention_backend

RANK, ALPHA = 4, 8.0
CFG = PRESETS["tiny"]
SDPA = get_attention_backend("torch_sdpa", dtype=torch.float32, head_dim=CFG.head_dim, device=torch.device("cpu"))

# (Wan module, kind): low-rank pairs on self-attn q, cross-attn k, ffn.0; full deltas on a norm and a bias.
PAIRS = ("blocks.0.self_attn.q", "blocks.1.cross_attn.k", "blocks.0.ffn.0")
DIFF = "blocks.0.norm3"      # .diff -> weight
DIFF_B = "blocks.1.ffn.2"    # .diff_b -> bias
DIFF_M = "blocks.1"          # .diff_m -> modulation (LightX2V)


def tiny_dit(seed=0) -> WanDiT:
    torch.manual_seed(seed)
    model = WanDiT(CFG, SDPA).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            offset = 1.0 if "norm" in name and "weight" in name else 0.0
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.5) + offset)
    return model


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, CFG.in_dim, 3, 8, 8, generator=g)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 16, CFG.text_dim, generator=g)
    return x, t, ctx


def run(model):
    with torch.no_grad():
        return model(*inputs())


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def random_factors(model, seed, modules=PAIRS, deltas=True):
    """{module: (down [r, in], up [out, r])} plus full deltas {param name: tensor}, in our (Wan) names."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    pairs = {}
    for m in modules:
        w = params[f"{m}.weight"]
        pairs[m] = (torch.randn(RANK, w.shape[1], generator=g) * 0.2, torch.randn(w.shape[0], RANK, generator=g) * 0.2)
    full = {}
    if deltas:
        for name in (f"{DIFF}.weight", f"{DIFF_B}.bias", f"{DIFF_M}.modulation"):
            full[name] = torch.randn(params[name].shape, generator=g) * 0.1
    return pairs, full


def _diff_suffix(name):
    return {"weight": ".diff", "bias": ".diff_b", "modulation": ".diff_m"}[name.rpartition(".")[2]]


def write_lora(path, pairs, full, fmt, alpha=ALPHA):
    """Write factors in one of the key layouts; returns the path."""
    sd = {}
    for m, (down, up) in pairs.items():
        if fmt == "kohya":
            base, d, u = "lora_unet_" + m.replace(".", "_"), ".lora_down.weight", ".lora_up.weight"
        elif fmt in ("diffusers", "diffusers_bare", "peft"):
            prefix = {"diffusers": "transformer.", "diffusers_bare": "", "peft": "base_model.model."}[fmt]
            base = prefix + dit_key_to_diffusers(m + ".weight")[: -len(".weight")]
            d, u = ".lora_A.weight", ".lora_B.weight"
        elif fmt == "wan_ab":
            base, d, u = "diffusion_model." + m, ".lora_A.weight", ".lora_B.weight"
        elif fmt in ("wan_updown", "wan_pt"):
            base, d, u = "diffusion_model." + m, ".lora_down.weight", ".lora_up.weight"
        else:
            raise ValueError(fmt)
        sd[base + d], sd[base + u] = down.contiguous(), up.contiguous()
        if alpha is not None:
            sd[base + ".alpha"] = torch.tensor(alpha)
    for name, t in full.items():
        module = name.rpartition(".")[0]
        if fmt == "kohya":
            key = "lora_unet_" + module.replace(".", "_") + _diff_suffix(name)
        elif fmt.startswith("wan"):
            key = "diffusion_model." + module + _diff_suffix(name)
        else:  # diffusers layouts carry bias deltas as PEFT's lora_B.bias, and LightX2V-style .diff otherwise
            key = module + _diff_suffix(name)
        sd[key] = t.contiguous()
    if fmt == "wan_pt":
        path = path.with_suffix(".pt")
        torch.save(sd, path)
    else:
        save_file(sd, str(path))
    return str(path)


def expected_weights(model, loras):
    """Hand-computed W + sum_i strength_i * alpha / rank * B_i @ A_i (and + strength * delta)."""
    want = {k: v.clone() for k, v in model.state_dict().items()}
    for (pairs, full), strength, alpha in loras:
        scale = strength * (alpha / RANK if alpha is not None else 1.0)
        for m, (down, up) in pairs.items():
            want[f"{m}.weight"] += scale * up @ down
        for name, t in full.items():
            want[name] += strength * t
    return want


def assert_weights(model, want, tol=1e-6):
    got = model.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert (got[k] - want[k]).abs().max().item() <= tol, k


FORMATS = ["kohya", "diffusers", "diffusers_bare", "peft", "wan_ab", "wan_updown", "wan_pt"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_merge_each_format_matches_hand_computation(tmp_path, fmt):
    model = tiny_dit()
    factors = random_factors(model, seed=3)
    path = write_lora(tmp_path / f"{fmt}.safetensors", *factors, fmt)
    want = expected_weights(model, [(factors, 0.7, ALPHA)])
    handle = apply_lora(model, LoRAConfig((LoRASpec(path, 0.7),)))
    assert_weights(model, want)
    # 3 low-rank modules + norm3 + ffn.2 + blocks.1 (modulation)
    assert handle.patched == {path: 6}
    expected_format = {"kohya": "kohya", "wan_ab": "wan", "wan_updown": "wan", "wan_pt": "wan"}.get(fmt, "diffusers")
    assert expected_format in load_lora(path, tiny_dit()).format.split("+")


def test_no_alpha_means_scale_strength(tmp_path):
    model = tiny_dit()
    factors = random_factors(model, seed=4, deltas=False)
    path = write_lora(tmp_path / "a.safetensors", *factors, "wan_ab", alpha=None)
    want = expected_weights(model, [(factors, 0.5, None)])
    apply_lora(model, LoRAConfig((LoRASpec(path, 0.5),)))
    assert_weights(model, want)


def test_diffusers_metadata_alpha(tmp_path):
    """diffusers writes PEFT's LoraConfig into the safetensors header; its lora_alpha sets the scale."""
    import json

    model = tiny_dit()
    pairs, _ = random_factors(model, seed=5, deltas=False)
    sd = {}
    for m, (down, up) in pairs.items():
        base = "transformer." + dit_key_to_diffusers(m + ".weight")[: -len(".weight")]
        sd[base + ".lora_A.weight"], sd[base + ".lora_B.weight"] = down, up
    meta = {"transformer.r": RANK, "transformer.lora_alpha": ALPHA,
            "transformer.alpha_pattern": {"blocks.0.ffn.net.0.proj": 2.0}}
    path = tmp_path / "meta.safetensors"
    save_file(sd, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    want = {k: v.clone() for k, v in model.state_dict().items()}
    for m, (down, up) in pairs.items():
        want[f"{m}.weight"] += (2.0 if m == "blocks.0.ffn.0" else ALPHA) / RANK * up @ down
    apply_lora(model, LoRAConfig((LoRASpec(str(path)),)))
    assert_weights(model, want)


def test_peft_lora_bias(tmp_path):
    """PEFT's lora_B.bias (what diffusers turns LightX2V's diff_b into) is scaled like its pair."""
    model = tiny_dit()
    (down, up), = random_factors(model, seed=9, modules=("blocks.0.ffn.0",), deltas=False)[0].values()
    b = torch.randn(CFG.ffn_dim)
    path = tmp_path / "bias.safetensors"
    save_file({"transformer.blocks.0.ffn.net.0.proj.lora_A.weight": down,
               "transformer.blocks.0.ffn.net.0.proj.lora_B.weight": up,
               "transformer.blocks.0.ffn.net.0.proj.lora_B.bias": b,
               "transformer.blocks.0.ffn.net.0.proj.alpha": torch.tensor(ALPHA)}, str(path))
    w0, b0 = model.blocks[0].ffn[0].weight.clone(), model.blocks[0].ffn[0].bias.clone()
    apply_lora(model, LoRAConfig((LoRASpec(str(path), 0.5),)))
    assert (model.blocks[0].ffn[0].weight - (w0 + 0.5 * ALPHA / RANK * up @ down)).abs().max() <= 1e-6
    assert (model.blocks[0].ffn[0].bias - (b0 + 0.5 * ALPHA / RANK * b)).abs().max() <= 1e-6


def test_two_loras_summed(tmp_path):
    model = tiny_dit()
    f1 = random_factors(model, seed=6)
    f2 = random_factors(model, seed=7, modules=("blocks.0.self_attn.q", "blocks.1.self_attn.o"))
    p1 = write_lora(tmp_path / "one.safetensors", *f1, "kohya")
    p2 = write_lora(tmp_path / "two.safetensors", *f2, "wan_ab")
    want = expected_weights(model, [(f1, 1.0, ALPHA), (f2, -0.4, ALPHA)])
    apply_lora(model, LoRAConfig((LoRASpec(p1), LoRASpec(p2, -0.4))))
    assert_weights(model, want)


def test_conv_patch_embedding_lora(tmp_path):
    """A LoRA on the Conv3d patch embedding (lora_down [r, in, kt, kh, kw], lora_up [out, r, 1, 1, 1])."""
    model = tiny_dit()
    w = model.patch_embedding.weight
    g = torch.Generator().manual_seed(8)
    down = torch.randn(RANK, *w.shape[1:], generator=g) * 0.2
    up = torch.randn(w.shape[0], RANK, 1, 1, 1, generator=g) * 0.2
    path = tmp_path / "conv.safetensors"
    save_file({"diffusion_model.patch_embedding.lora_down.weight": down,
               "diffusion_model.patch_embedding.lora_up.weight": up,
               "diffusion_model.patch_embedding.alpha": torch.tensor(ALPHA)}, str(path))
    want = w + ALPHA / RANK * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    merged = tiny_dit()
    apply_lora(merged, LoRAConfig((LoRASpec(str(path)),)))
    assert (merged.patch_embedding.weight - want).abs().max() <= 1e-6
    handle = apply_lora(model, LoRAConfig((LoRASpec(str(path)),), "dynamic"))
    assert rel(run(model), run(merged)) <= 1e-5
    handle.remove()
    assert torch.equal(model.patch_embedding.weight, w)


def test_dynamic_equals_merge_switch_and_remove(tmp_path):
    base = tiny_dit()
    ref = run(base)
    weights_before = {k: v.clone() for k, v in base.state_dict().items()}
    f1, f2 = random_factors(base, seed=10), random_factors(base, seed=11, modules=("blocks.1.self_attn.v", "head.head"))
    p1 = write_lora(tmp_path / "one.safetensors", *f1, "diffusers")
    p2 = write_lora(tmp_path / "two.safetensors", *f2, "kohya")
    cfg1 = LoRAConfig((LoRASpec(p1, 0.9),), "dynamic")
    cfg12 = LoRAConfig((LoRASpec(p2, 1.0), LoRASpec(p1, 0.3)), "dynamic")

    def merged_output(cfg):
        m = tiny_dit()
        apply_lora(m, LoRAConfig(cfg.loras, "merge"))
        return run(m)

    handle = apply_lora(base, cfg1)
    out1 = run(base)
    assert rel(out1, merged_output(cfg1)) <= 1e-5
    assert rel(out1, ref) > 1e-2
    # Base Linear weights are untouched by the low-rank path (only the copy-on-apply deltas differ).
    for name in ("blocks.0.self_attn.q.weight", "blocks.1.cross_attn.k.weight", "blocks.0.ffn.0.weight"):
        assert torch.equal(base.state_dict()[name], weights_before[name])
    assert handle.patched == {p1: 6}

    handle.switch_lora(cfg12)
    assert rel(run(base), merged_output(cfg12)) <= 1e-5
    assert handle.patched == {p2: 5, p1: 6}

    handle.switch_lora(cfg1)
    assert rel(run(base), out1) <= 1e-6

    handle.remove()
    assert torch.equal(run(base), ref)
    for k, v in base.state_dict().items():
        assert torch.equal(v, weights_before[k]), k
    assert all(not m._forward_hooks for m in base.modules())


def test_switch_to_bad_file_keeps_current(tmp_path):
    model = tiny_dit()
    p1 = write_lora(tmp_path / "one.safetensors", *random_factors(model, seed=12), "wan_ab")
    handle = apply_lora(model, LoRAConfig((LoRASpec(p1),), "dynamic"))
    out = run(model)
    bad = tmp_path / "bad.safetensors"
    save_file({"diffusion_model.blocks.7.self_attn.q.lora_A.weight": torch.zeros(RANK, CFG.dim),
               "diffusion_model.blocks.7.self_attn.q.lora_B.weight": torch.zeros(CFG.dim, RANK)}, str(bad))
    with pytest.raises(CheckpointError):
        handle.switch_lora(LoRAConfig((LoRASpec(str(bad)),), "dynamic"))
    assert torch.equal(run(model), out)


def test_merge_handle_cannot_switch_or_remove(tmp_path):
    model = tiny_dit()
    p1 = write_lora(tmp_path / "one.safetensors", *random_factors(model, seed=13), "wan_ab")
    handle = apply_lora(model, LoRAConfig((LoRASpec(p1),)))
    with pytest.raises(UserError, match="dynamic"):
        handle.remove()
    with pytest.raises(UserError, match="dynamic"):
        handle.switch_lora(LoRAConfig((LoRASpec(p1),), "dynamic"))


@pytest.mark.parametrize("mode", ["merge", "dynamic"])
def test_strength_zero_and_one(tmp_path, mode):
    model = tiny_dit()
    ref = run(model)
    path = write_lora(tmp_path / "l.safetensors", *random_factors(model, seed=14), "kohya")
    h = apply_lora(model, LoRAConfig((LoRASpec(path, 0.0),), mode))
    assert torch.equal(run(model), ref)
    if mode == "dynamic":
        h.remove()
        model2 = model
    else:
        model2 = tiny_dit()
    apply_lora(model2, LoRAConfig((LoRASpec(path, 1.0),), mode))
    assert rel(run(model2), ref) > 1e-2


def test_unmatched_keys_listed(tmp_path):
    model = tiny_dit()
    pairs, _ = random_factors(model, seed=15)
    sd = {}
    for m, (down, up) in pairs.items():
        sd[f"diffusion_model.{m}.lora_A.weight"], sd[f"diffusion_model.{m}.lora_B.weight"] = down, up
    extra = {
        "diffusion_model.blocks.9.self_attn.q.lora_A.weight": torch.zeros(RANK, CFG.dim),  # no block 9
        "diffusion_model.blocks.9.self_attn.q.lora_B.weight": torch.zeros(CFG.dim, RANK),
        "lora_unet_blocks_0_self_attn_zz.lora_down.weight": torch.zeros(RANK, CFG.dim),  # no such layer
        "lora_unet_blocks_0_self_attn_zz.lora_up.weight": torch.zeros(CFG.dim, RANK),
        "diffusion_model.blocks.0.self_attn.q.diff_m": torch.zeros(3),  # Linear has no modulation
        "diffusion_model.blocks.0.weird_thing": torch.zeros(3),  # unknown kind of key
    }
    path = tmp_path / "bad.safetensors"
    save_file({**sd, **extra}, str(path))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        apply_lora(model, LoRAConfig((LoRASpec(str(path)),)))
    for key in extra:
        assert key in str(e.value)
    for m in PAIRS:  # the good keys are not reported
        assert f"{m}.lora_A" not in str(e.value)
    for k, v in model.state_dict().items():  # nothing applied
        assert torch.equal(v, before[k])


def test_wrong_shape_named(tmp_path):
    model = tiny_dit()
    path = tmp_path / "shape.safetensors"
    save_file({"diffusion_model.blocks.0.ffn.0.lora_A.weight": torch.zeros(RANK, CFG.dim),
               "diffusion_model.blocks.0.ffn.0.lora_B.weight": torch.zeros(CFG.dim, RANK),  # ffn.0 is [ffn_dim, dim]
               "diffusion_model.blocks.0.norm3.diff_b": torch.zeros(CFG.dim + 1)}, str(path))
    with pytest.raises(CheckpointError, match="shape") as e:
        apply_lora(model, LoRAConfig((LoRASpec(str(path)),)))
    assert "blocks.0.ffn.0.lora_B.weight" in str(e.value) and "blocks.0.norm3.diff_b" in str(e.value)


def test_incomplete_pair(tmp_path):
    path = tmp_path / "half.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(RANK, CFG.dim)}, str(path))
    with pytest.raises(CheckpointError, match="incomplete"):
        apply_lora(tiny_dit(), LoRAConfig((LoRASpec(str(path)),)))


def test_from_lightx2v(tmp_path):
    path = write_lora(tmp_path / "l.safetensors", *random_factors(tiny_dit(), seed=16), "wan_ab")
    cfg = LoRAConfig.from_lightx2v([{"path": path, "strength": 0.5}, {"path": path}])
    assert cfg == LoRAConfig((LoRASpec(path, 0.5), LoRASpec(path, 1.0)), "merge")
    assert LoRAConfig.from_lightx2v([{"path": path}], mode="dynamic").mode == "dynamic"
    named = LoRAConfig.from_lightx2v([{"path": path, "strength": 1.0, "name": "high_noise_model"}])
    assert named.loras[0].name == "high_noise_model"  # the expert of a two-expert model it goes to
    with pytest.raises(UserError, match="name"):  # the names come from the model family (Wan2.2's experts)
        LoRAConfig.from_lightx2v([{"path": path, "strength": 1.0, "name": "medium_noise_model"}],
                                 names=("high_noise_model", "low_noise_model"))
    missing = str(tmp_path / "missing.safetensors")
    with pytest.raises(UserError, match="missing.safetensors"):
        LoRAConfig.from_lightx2v([{"path": missing}])
    for bad in (float("nan"), float("inf"), "1.0", None, True):
        with pytest.raises(UserError, match="strength"):
            LoRAConfig.from_lightx2v([{"path": path, "strength": bad}])
    with pytest.raises(UserError, match="mode"):
        LoRAConfig((), "fuse")
    with pytest.raises(UserError, match="does not exist"):
        apply_lora(tiny_dit(), LoRAConfig((LoRASpec(missing),)))


# --- quantized weights ----------------------------------------------------------------------------------------


class FakeQuantLinear(nn.Module):
    """A Linear holding a per-output-channel quantized weight (int8 / fp8) and its float32 scale [out, 1]."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_weight(linear.weight.detach(), dtype)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        return F.linear(x, dequantize_weight(self.weight, self.weight_scale), self.bias)


class Toy(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.proj = FakeQuantLinear(nn.Linear(32, 48), dtype)
        self.out = nn.Linear(48, 8)

    def forward(self, x):
        return self.out(F.gelu(self.proj(x)))


def _qerr_bound(w_ref, scale, dtype):
    """Worst rounding error of one quantisation step: half a step for int8, 2^-4 relative (3 mantissa bits) for
    fp8 e4m3 (plus the subnormal step)."""
    if dtype == torch.int8:
        return 0.5 * scale.expand_as(w_ref) + 1e-6
    return w_ref.abs() * 2.0 ** -4 + scale.expand_as(w_ref) * 2.0 ** -9 + 1e-6


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_quantized_merge_requantizes(tmp_path, dtype):
    toy = Toy(dtype)
    g = torch.Generator().manual_seed(1)
    down, up = torch.randn(RANK, 32, generator=g), torch.randn(48, RANK, generator=g)
    diff_b = torch.randn(48, generator=g)
    path = tmp_path / "q.safetensors"
    save_file({"proj.lora_A.weight": down, "proj.lora_B.weight": up, "proj.alpha": torch.tensor(ALPHA),
               "proj.diff_b": diff_b}, str(path))
    w_float = dequantize_weight(toy.proj.weight, toy.proj.weight_scale)
    want = w_float + ALPHA / RANK * up @ down  # the float merge, with large entries (the row ranges grow)
    x = torch.randn(5, 32, generator=g)

    dyn = Toy(dtype)
    handle = apply_lora(dyn, LoRAConfig((LoRASpec(str(path)),), "dynamic"))
    assert torch.equal(dyn.proj.weight, toy.proj.weight)  # low-rank path: quantized weight untouched
    with torch.no_grad():
        y_dyn = dyn(x)

    apply_lora(toy, LoRAConfig((LoRASpec(str(path)),)))
    assert toy.proj.weight.dtype == dtype and toy.proj.weight_scale.shape == (48, 1)
    got = dequantize_weight(toy.proj.weight, toy.proj.weight_scale)
    err = (got - want).abs()
    assert (err <= _qerr_bound(want, toy.proj.weight_scale, dtype)).all(), err.max()
    # The scales were recomputed for the patched rows (the old ones would clip them).
    assert (toy.proj.weight_scale * _QMAX(dtype) >= want.abs().amax(1, keepdim=True) * (1 - 1e-6)).all()
    assert torch.allclose(toy.proj.bias, Toy(dtype).proj.bias + diff_b, atol=1e-6)
    with torch.no_grad():  # dynamic (exact low-rank on the original quantized weight) ~ merged (requantized)
        y_merge = toy(x)
    assert rel(y_merge, y_dyn) <= (0.02 if dtype == torch.int8 else 0.1)
    handle.remove()
    ref = Toy(dtype)
    assert torch.equal(dyn.proj.weight, ref.proj.weight) and torch.equal(dyn.proj.bias, ref.proj.bias)


def _QMAX(dtype):
    return 127.0 if dtype == torch.int8 else 448.0


def test_quantized_dynamic_diff_restores(tmp_path):
    """A full delta on a quantized weight in dynamic mode: dequantize/add/requantize a copy, put the original back."""
    toy = Toy(torch.int8)
    w0, s0 = toy.proj.weight.clone(), toy.proj.weight_scale.clone()
    diff = torch.randn(48, 32) * 0.05
    path = tmp_path / "d.safetensors"
    save_file({"proj.diff": diff}, str(path))
    handle = apply_lora(toy, LoRAConfig((LoRASpec(str(path)),), "dynamic"))
    got = dequantize_weight(toy.proj.weight, toy.proj.weight_scale)
    want = dequantize_weight(w0, s0) + diff
    assert ((got - want).abs() <= _qerr_bound(want, toy.proj.weight_scale, torch.int8)).all()
    handle.remove()
    assert torch.equal(toy.proj.weight, w0) and torch.equal(toy.proj.weight_scale, s0)


def test_kohya_names_matched_against_real_modules(tmp_path):
    """Underscored kohya paths are looked up among the model's module names; two modules that flatten to the
    same underscored name are reported as ambiguous, not guessed."""

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.b_c = nn.Linear(4, 4)

    class Amb(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = Inner()                                     # a.b_c
            self.a_b = nn.ModuleDict({"c": nn.Linear(4, 4)})     # a_b.c
            self.self_attn_q = nn.Linear(4, 4)                   # underscores that are part of the name

    model = Amb()
    path = tmp_path / "k.safetensors"
    save_file({"lora_unet_self_attn_q.lora_down.weight": torch.ones(1, 4),
               "lora_unet_self_attn_q.lora_up.weight": torch.ones(4, 1)}, str(path))
    w0 = model.self_attn_q.weight.clone()
    apply_lora(model, LoRAConfig((LoRASpec(str(path)),)))
    assert torch.allclose(model.self_attn_q.weight, w0 + 1)
    save_file({"lora_unet_a_b_c.lora_down.weight": torch.ones(1, 4),
               "lora_unet_a_b_c.lora_up.weight": torch.ones(4, 1)}, str(path))
    with pytest.raises(CheckpointError, match="ambiguous"):
        apply_lora(model, LoRAConfig((LoRASpec(str(path)),)))


def test_merge_bf16_rounds_once(tmp_path):
    model = tiny_dit().to(torch.bfloat16)
    factors = random_factors(model, seed=17, deltas=False)
    path = write_lora(tmp_path / "l.safetensors", *factors, "wan_ab")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    f2 = write_lora(tmp_path / "l2.safetensors", *factors, "kohya")
    apply_lora(model, LoRAConfig((LoRASpec(path, 0.5), LoRASpec(f2, 0.25))))
    for m, (down, up) in factors[0].items():
        want = (before[f"{m}.weight"].float() + 0.75 * ALPHA / RANK * up @ down).to(torch.bfloat16)
        got = model.state_dict()[f"{m}.weight"]
        assert got.dtype == torch.bfloat16
        assert (got.float() - want.float()).abs().max() <= 2 ** -7 * want.float().abs().max()


def test_same_layer_under_two_spellings_rejected(tmp_path):
    path = tmp_path / "dup.safetensors"
    a, b = torch.zeros(RANK, CFG.dim), torch.zeros(CFG.dim, RANK)
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": a,
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": b,
               "transformer.blocks.0.attn1.to_q.lora_A.weight": a.clone(),
               "transformer.blocks.0.attn1.to_q.lora_B.weight": b.clone()}, str(path))
    with pytest.raises(CheckpointError, match="twice"):
        apply_lora(tiny_dit(), LoRAConfig((LoRASpec(str(path)),)))
