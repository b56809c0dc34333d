"""Feature-caching hooks on a tiny random WanDiT: a 10-step UniPC loop with CFG, CPU float32."""

import json
from pathlib import Path

import pytest
import torch

from lightx2v.errors import UserError
from lightx2v.hooks.caching import (
    CACHE_KEYS,
    MAGCACHE_RATIOS,
    PRESETS,
    TEACACHE_COEFFICIENTS,
    CacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    NoCacheConfig,
    TeaCacheConfig,
    apply_feature_caching,
    nearest_interp,
)
from lightx2v.models.wan.arch import preset
from lightx2v.models.wan.dit import WanDiT
from lightx2v.ops.attention import get_attention_backend
from lightx2v.schedulers import make_scheduler

STEPS = 10
LAYERS = 3
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "caching"


@pytest.fixture(scope="module")
def model():
    attn = get_attention_backend("torch_sdpa", dtype=torch.float32, head_dim=16, device=torch.device("cpu"))
    m = WanDiT(preset("tiny", num_layers=LAYERS), attn).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            scale = 0.3 if p.ndim > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if "norm" in name and "weight" in name else 0.0))
    return m


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)
    ctx = torch.randn(1, 8, 32, generator=g)
    ctx_neg = torch.randn(1, 8, 32, generator=g)
    return x, ctx, ctx_neg


class BlockCounter:
    """Counts block forwards, per branch (the test sets ``branch`` before each DiT call)."""

    def __init__(self, model):
        self.branch = "cond"
        self.calls = {"cond": 0, "uncond": 0}
        self.handles = [b.register_forward_pre_hook(self._pre) for b in model.blocks]

    def _pre(self, module, args):
        self.calls[self.branch] += 1

    def remove(self):
        for h in self.handles:
            h.remove()


def denoise(model, inputs, hook=None, guidance=5.0, steps=STEPS):
    """UniPC + CFG; returns the final latents and every DiT output [(branch, x_in, t, out)]."""
    x, ctx, ctx_neg = inputs
    sched = make_scheduler("unipc", shift=5.0)
    sched.set_timesteps(steps)
    counter = BlockCounter(model)
    calls = []
    if hook is not None:
        hook.begin_generation(steps)
    try:
        with torch.no_grad():
            for t in sched.timesteps:
                outs = {}
                for branch, c in (("cond", ctx), ("uncond", ctx_neg)):
                    if hook is not None:
                        hook.set_branch(branch)
                    counter.branch = branch
                    outs[branch] = model(x, t[None], c)
                    calls.append((branch, x, t, outs[branch]))
                v = outs["uncond"] + guidance * (outs["cond"] - outs["uncond"])
                x = sched.step(v, x)
    finally:
        counter.remove()
    return x, calls, counter.calls


@pytest.fixture(scope="module")
def baseline(model, inputs):
    return denoise(model, inputs)


def _cfgs_threshold_zero():
    ratios = MAGCACHE_RATIOS["wan2.1-t2v-1.3b"]
    return {
        "tea_ret": TeaCacheConfig(0.0, TEACACHE_COEFFICIENTS["wan2.1-t2v-1.3b"]["ret_steps"], True),
        "tea_noret": TeaCacheConfig(0.0, TEACACHE_COEFFICIENTS["wan2.1-t2v-1.3b"]["no_ret_steps"], False),
        "tea_identity": TeaCacheConfig(0.0, (1.0, 0.0), False),
        "mag": MagCacheConfig(0.0, 4, 0.2, ratios),
        "mag_k0": MagCacheConfig(1e9, 0, 0.0, ratios),  # K = 0: never more than 0 skips in a row
        "firstblock": FirstBlockCacheConfig(0.0),
        "nocache": NoCacheConfig(),
    }


@pytest.mark.parametrize("name", list(_cfgs_threshold_zero()))
def test_threshold_zero_is_bit_identical(model, inputs, baseline, name):
    cfg = _cfgs_threshold_zero()[name]
    want, want_calls, want_blocks = baseline
    hook = apply_feature_caching(model, cfg)
    try:
        got, calls, blocks = denoise(model, inputs, hook)
        stats = hook.stats()
    finally:
        hook.remove()
    assert torch.equal(got, want)
    assert all(torch.equal(a[3], b[3]) for a, b in zip(calls, want_calls))
    assert blocks == want_blocks == {"cond": STEPS * LAYERS, "uncond": STEPS * LAYERS}
    if name != "nocache":
        for b in ("cond", "uncond"):
            assert stats[b] == {"computed": STEPS, "skipped": 0, "skipped_steps": []}


@pytest.mark.parametrize("name, cfg, skipped", [
    # use_ret_steps: steps 0..4 always computed, nothing forced at the end
    ("tea_ret", TeaCacheConfig(1e9, (1.0, 0.0), True), [5, 6, 7, 8, 9]),
    # without: step 0 and the last step always computed
    ("tea_noret", TeaCacheConfig(1e9, (1.0, 0.0), False), [1, 2, 3, 4, 5, 6, 7, 8]),
    # retention 0.2 of 10 steps: steps 0, 1 computed; then K=2 skips in a row, then a compute, ...
    ("mag", MagCacheConfig(1e9, 2, 0.2, MAGCACHE_RATIOS["wan2.1-t2v-1.3b"]), [2, 3, 5, 6, 8, 9]),
    ("firstblock", FirstBlockCacheConfig(1e9), list(range(1, STEPS))),
])
def test_large_threshold_skips(model, inputs, baseline, name, cfg, skipped):
    hook = apply_feature_caching(model, cfg)
    try:
        got, calls, blocks = denoise(model, inputs, hook)
        stats = hook.stats()
    finally:
        hook.remove()
    n_computed = STEPS - len(skipped)
    for b in ("cond", "uncond"):
        assert stats[b] == {"computed": n_computed, "skipped": len(skipped), "skipped_steps": skipped}
        # the counted block forwards agree: FirstBlock still runs block 0 on skipped steps
        per_skip = 1 if name == "firstblock" else 0
        assert blocks[b] == n_computed * LAYERS + len(skipped) * per_skip
    assert torch.isfinite(got).all()
    assert not torch.equal(got, baseline[0])
    # a skipped step returns input tokens + the residual cached at the last computed step: its output differs
    # from the uncached model's output at that step, a computed step before any skip does not.
    first_skip = 2 * skipped[0]  # calls alternate cond, uncond
    assert torch.equal(calls[first_skip - 1][3], baseline[1][first_skip - 1][3])
    assert not torch.equal(calls[first_skip][3], baseline[1][first_skip][3])


def _expected_tea_skips(model, thresh, coefficients, use_ret_steps, steps=STEPS):
    """TeaCache's rule re-derived from its description, on the time embeddings of the schedule."""
    sched = make_scheduler("unipc", shift=5.0)
    sched.set_timesteps(steps)
    with torch.no_grad():
        xs = [model.embed_time(t[None])[1 if use_ret_steps else 0] for t in sched.timesteps]
    skipped, acc = [], 0.0
    for i, x in enumerate(xs):
        forced = i < 5 if use_ret_steps else i in (0, steps - 1)
        if forced:
            acc = 0.0
            continue
        d = ((x - xs[i - 1]).abs().mean() / xs[i - 1].abs().mean()).item()
        acc += max(0.0, sum(c * d ** (len(coefficients) - 1 - k) for k, c in enumerate(coefficients)))
        if acc < thresh:
            skipped.append(i)
        else:
            acc = 0.0
    return skipped


@pytest.mark.parametrize("use_ret_steps", [True, False])
def test_tea_accumulates_rescaled_distance(model, inputs, use_ret_steps):
    coefficients = (1.0, 2.0, 0.0)  # rescale d -> d^2 + 2 d
    probe = _expected_tea_skips(model, 1e9, coefficients, use_ret_steps)
    assert probe  # some steps can be skipped at all
    # pick a threshold that skips some of them but not all
    for thresh in (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0):
        want = _expected_tea_skips(model, thresh, coefficients, use_ret_steps)
        if 0 < len(want) < len(probe):
            break
    else:
        pytest.fail("no threshold gives a mix of skipped and computed steps")
    hook = apply_feature_caching(model, TeaCacheConfig(thresh, coefficients, use_ret_steps))
    try:
        denoise(model, inputs, hook)
        stats = hook.stats()
    finally:
        hook.remove()
    assert stats["cond"]["skipped_steps"] == stats["uncond"]["skipped_steps"] == want


def _replay(model, hook, calls, branch, ctx):
    """Feed one branch's recorded DiT inputs alone; returns its outputs."""
    outs = []
    hook.begin_generation(STEPS)
    hook.set_branch(branch)
    with torch.no_grad():
        for b, x_in, t, _ in calls:
            if b == branch:
                outs.append(model(x_in, t[None], ctx))
    return outs


def _mixed_firstblock_threshold(model, inputs):
    """A FirstBlock threshold between the smallest and largest step-to-step change of block 0's residual."""
    diffs = []
    hook = apply_feature_caching(model, FirstBlockCacheConfig(0.0))
    orig = hook._step

    def spy(branch, st, step, *args):
        prev = st.prev_first_residual
        out = orig(branch, st, step, *args)
        if prev is not None and branch == "cond":
            diffs.append(((st.prev_first_residual - prev).abs().mean() / prev.abs().mean()).item())
        return out

    hook._step = spy
    try:
        denoise(model, inputs, hook)
    finally:
        hook.remove()
    diffs.sort()
    return diffs[len(diffs) // 2]


@pytest.mark.parametrize("method", ["firstblock", "mag"])
def test_branches_are_independent(model, inputs, method):
    if method == "firstblock":
        cfg = FirstBlockCacheConfig(_mixed_firstblock_threshold(model, inputs))
    else:  # different tables per branch: the branches must take different decisions
        cfg = MagCacheConfig(0.25, 3, 0.0, ((0.97,) * STEPS, (0.8,) * STEPS))
    hook = apply_feature_caching(model, cfg)
    try:
        _, calls, _ = denoise(model, inputs, hook)
        interleaved = hook.stats()
        for branch in ("cond", "uncond"):
            outs = _replay(model, hook, calls, branch, inputs[1] if branch == "cond" else inputs[2])
            alone = hook.stats()[branch]
            assert alone == interleaved[branch]
            assert hook.stats()["uncond" if branch == "cond" else "cond"]["computed"] == 0
            want = [c[3] for c in calls if c[0] == branch]
            assert all(torch.equal(a, b) for a, b in zip(outs, want))
    finally:
        hook.remove()
    cond, uncond = interleaved["cond"]["skipped_steps"], interleaved["uncond"]["skipped_steps"]
    assert cond or uncond  # something was skipped
    assert len(cond) < STEPS - 1 or len(uncond) < STEPS - 1  # and something computed past step 0
    if method == "mag":
        assert cond != uncond


def test_mag_calibration_records_ratios(model, inputs, baseline):
    cfg = CacheConfig.from_lightx2v({"feature_caching": "Mag", "magcache_calibration": True, "magcache_K": 4,
                                     "magcache_thresh": 0.12, "magcache_retention_ratio": 0.2})
    hook = apply_feature_caching(model, cfg)
    # the block-stack residual of each call, observed independently of the hook
    residuals, ins = [], []
    h0 = model.blocks[0].register_forward_pre_hook(lambda m, a: ins.append(a[0].clone()))  # blocks update in place
    h1 = model.blocks[-1].register_forward_hook(lambda m, a, out: residuals.append(out - ins[-1]))
    try:
        got, _, _ = denoise(model, inputs, hook)
        ratios = hook.calibration_result()
        stats = hook.stats()
    finally:
        h0.remove()
        h1.remove()
        hook.remove()
    assert torch.equal(got, baseline[0])  # calibration never skips
    assert stats["cond"]["skipped"] == stats["uncond"]["skipped"] == 0
    assert len(ratios) == 2 and all(len(r) == STEPS for r in ratios)
    assert ratios[0][0] == ratios[1][0] == 1.0
    for b, rs in enumerate(ratios):
        res = residuals[b::2]  # calls alternate cond, uncond
        for s in range(1, STEPS):
            want = (res[s].norm(dim=-1) / res[s - 1].norm(dim=-1)).mean().item()
            assert rs[s] == round(want, 5)
    # the result pastes into a config
    again = CacheConfig.from_lightx2v(dict(cfg.to_lightx2v(), magcache_calibration=False, magcache_ratios=ratios))
    assert again.magcache_ratios == (tuple(ratios[0]), tuple(ratios[1]))


@pytest.mark.parametrize("cfg", [
    TeaCacheConfig(3.0, (1.0, 0.0), True),
    MagCacheConfig(0.3, 2, 0.2, MAGCACHE_RATIOS["wan2.1-i2v-14b-480p"]),
    FirstBlockCacheConfig(1.05, downsample_factor=2),
])
def test_reset_makes_generations_identical(model, inputs, cfg):
    hook = apply_feature_caching(model, cfg)
    try:
        first, _, _ = denoise(model, inputs, hook)
        s1 = hook.stats()
        denoise(model, inputs, hook, guidance=3.0, steps=7)  # leaves other residuals and accumulators behind
        hook.reset()
        assert hook.stats()["cond"] == {"computed": 0, "skipped": 0, "skipped_steps": []}
        second, _, _ = denoise(model, inputs, hook)
        s2 = hook.stats()
    finally:
        hook.remove()
    assert torch.equal(first, second)
    assert s1 == s2
    assert s1["cond"]["skipped"] > 0


def test_steps_beyond_the_announced_count_raise(model, inputs):
    hook = apply_feature_caching(model, TeaCacheConfig(0.1, (1.0, 0.0), True))
    x, ctx, _ = inputs
    try:
        with torch.no_grad(), pytest.raises(RuntimeError, match="begin_generation"):
            model(x, torch.tensor([500.0]), ctx)  # no begin_generation
        hook.begin_generation(1)
        with torch.no_grad():
            model(x, torch.tensor([500.0]), ctx)
            with pytest.raises(RuntimeError, match="more than the 1 steps"):
                model(x, torch.tensor([400.0]), ctx)
    finally:
        hook.remove()


def test_install_and_remove(model):
    stack = model.block_stack
    assert stack.hooks == ()
    hook = apply_feature_caching(model, TeaCacheConfig(0.1, (1.0, 0.0), False))
    assert stack.hooks == (hook,) and "run_blocks" not in vars(model)  # a hook on the stack, no method replaced
    with pytest.raises(RuntimeError, match="already applied"):
        apply_feature_caching(model, FirstBlockCacheConfig(0.1))
    hook.remove()
    hook.remove()
    assert stack.hooks == ()
    # composition: an inner block-stack hook (e.g. sequence parallel) runs under Tea's computed steps, and under
    # FirstBlock's two partial runs (block 0, then blocks 1..N-1)
    seen = []

    def inner_hook(inner, tokens, args, start, stop):
        seen.append((start, stop))
        return inner(tokens, args, start, stop)

    stack.add_hook(inner_hook, order=0)
    try:
        x, ctx = torch.randn(1, 16, 1, 4, 4), torch.randn(1, 8, 32)
        for cfg, want in ((TeaCacheConfig(0.0, (1.0, 0.0), True), [(0, None)]),
                          (FirstBlockCacheConfig(0.0), [(0, 1), (1, None)])):
            seen.clear()
            hook = apply_feature_caching(model, cfg)
            assert stack.hooks == (inner_hook, hook)  # caching outside the inner hook
            hook.begin_generation(2)
            with torch.no_grad():
                model(x, torch.tensor([900.0]), ctx)
            assert seen == want
            hook.remove()
    finally:
        stack.remove_hook(inner_hook)
    noop = apply_feature_caching(model, {"feature_caching": "NoCaching"})
    assert stack.hooks == ()
    noop.set_branch("uncond")
    noop.begin_generation(3)
    assert noop.stats() == {}
    noop.remove()
    with pytest.raises(ValueError, match="branch"):
        noop.set_branch("negative")


# --- configs --------------------------------------------------------------------------------------------------

def test_from_lightx2v_methods_and_forms():
    tea = CacheConfig.from_lightx2v(PRESETS["tea-wan2.1-i2v-14b-480p"])
    assert isinstance(tea, TeaCacheConfig) and tea.use_ret_steps
    assert tea.coefficients == TEACACHE_COEFFICIENTS["wan2.1-i2v-14b-480p"]["ret_steps"]
    no_ret = CacheConfig.from_lightx2v(dict(PRESETS["tea-wan2.1-i2v-14b-480p"], use_ret_steps=False))
    assert no_ret.coefficients == TEACACHE_COEFFICIENTS["wan2.1-i2v-14b-480p"]["no_ret_steps"]
    # MagCache's flat interleaved table == LightX2V's [cond, uncond]
    cond, uncond = MAGCACHE_RATIOS["wan2.1-t2v-1.3b"]
    flat = [v for pair in zip(cond, uncond) for v in pair]
    base = {"feature_caching": "Mag", "magcache_K": 4, "magcache_thresh": 0.12, "magcache_retention_ratio": 0.2}
    a = CacheConfig.from_lightx2v(dict(base, magcache_ratios=flat))
    b = CacheConfig.from_lightx2v(dict(base, magcache_ratios=[list(cond), list(uncond)]))
    assert a == b and len(a.magcache_ratios[0]) == 50
    assert CacheConfig.from_lightx2v({}) == CacheConfig.from_lightx2v({"feature_caching": None}) == NoCacheConfig()
    for name, d in PRESETS.items():
        cfg = CacheConfig.from_lightx2v(d)
        assert CacheConfig.from_lightx2v(cfg.to_lightx2v()) == cfg, name


def test_published_constants():
    for c in TEACACHE_COEFFICIENTS.values():
        assert len(c["ret_steps"]) == len(c["no_ret_steps"]) == 5
    steps = {"wan2.1-t2v-1.3b": 50, "wan2.1-t2v-14b": 50, "wan2.1-i2v-14b-480p": 40, "wan2.1-i2v-14b-720p": 40}
    for name, (cond, uncond) in MAGCACHE_RATIOS.items():
        assert len(cond) == len(uncond) == steps[name] and cond[0] == uncond[0] == 1.0
    # spot values (TeaCache4Wan2.1 / MagCache4Wan2.1 / LightX2V configs)
    assert TEACACHE_COEFFICIENTS["wan2.1-t2v-1.3b"]["ret_steps"][0] == -5.21862437e04
    assert MAGCACHE_RATIOS["wan2.1-i2v-14b-480p"][1][-1] == 0.92616
    assert nearest_interp((1.0, 2.0, 3.0, 4.0, 5.0), 3) == (1.0, 3.0, 5.0)
    assert nearest_interp((1.0, 2.0), 1) == (2.0,)


@pytest.mark.parametrize("name, method", [("teacache", "Tea"), ("magcache", "Mag"), ("firstblock", "FirstBlock")])
def test_example_configs_load(name, method):
    d = json.loads((CONFIGS / f"{name}.json").read_text())
    cfg = CacheConfig.from_lightx2v({k: v for k, v in d.items() if k in CACHE_KEYS})
    assert cfg.method == method


@pytest.mark.parametrize("d, match", [
    ({"feature_caching": "Taylor"}, r"'Taylor' is not supported; allowed: 'NoCaching', 'Tea', 'Mag', 'FirstBlock'"),
    ({"feature_caching": "TaylorSeer"}, "LightX2V method this version does not implement"),
    ({"feature_caching": "FirstBlock", "residual_diff_treshold": 0.1},
     r"'residual_diff_treshold' \(did you mean 'residual_diff_threshold'"),
    ({"feature_caching": "Tea", "teacache_thresh": 0.1, "use_ret_steps": True}, "needs 'coefficients'"),
    ({"feature_caching": "FirstBlock", "residual_diff_threshold": 0.1, "magcache_K": 2},
     "'magcache_K' \\(a key of 'Mag'"),
    ({"feature_caching": "NoCaching", "teacache_thresh": 0.2}, "'teacache_thresh' \\(a key of 'Tea'"),
    ({"teacache_thresh": 0.2}, "'teacache_thresh'"),
    ({"feature_caching": "Mag", "magcache_K": 2, "magcache_thresh": 0.1, "magcache_retention_ratio": 0.2},
     "needs 'magcache_ratios'"),
    ({"feature_caching": "Mag", "magcache_K": 2.5, "magcache_thresh": 0.1, "magcache_retention_ratio": 0.2,
      "magcache_ratios": [1.0, 1.0]}, "magcache_K=2.5"),
    ({"feature_caching": "Mag", "magcache_K": 2, "magcache_thresh": 0.1, "magcache_retention_ratio": 1.5,
      "magcache_ratios": [1.0, 1.0]}, "magcache_retention_ratio=1.5"),
    ({"feature_caching": "Mag", "magcache_K": 2, "magcache_thresh": 0.1, "magcache_retention_ratio": 0.2,
      "magcache_ratios": [1.0, 1.0, 1.0]}, "even length"),
    ({"feature_caching": "Tea", "teacache_thresh": -1, "use_ret_steps": True, "coefficients": [1.0]},
     "teacache_thresh=-1"),
    ({"feature_caching": "Tea", "teacache_thresh": 0.1, "use_ret_steps": "yes", "coefficients": [1.0]},
     "use_ret_steps='yes'"),
    ({"feature_caching": "Tea", "teacache_thresh": 0.1, "use_ret_steps": True, "coefficients": [[1.0]]},
     "two polynomials"),
    ({"feature_caching": "FirstBlock", "residual_diff_threshold": 0.1, "downsample_factor": 0}, "downsample_factor=0"),
])
def test_config_errors(d, match):
    with pytest.raises(UserError, match=match):
        CacheConfig.from_lightx2v(d)
