"""Feature caching for the Wan DiT: skip the whole block stack on some denoising steps and reuse a cached residual.

Every method caches the residual of the block stack, ``run_blocks(tokens) - tokens`` ([B, L, C], model dtype), and
on a skipped step returns ``tokens + residual``. The cond and uncond branches of classifier-free guidance are
cached separately: the runner calls ``hook.set_branch("cond" | "uncond")`` before each DiT forward.

Methods (``feature_caching`` in LightX2V's configs):

- ``Tea`` (TeaCache, ali-vilab/TeaCache ``TeaCache4Wan2.1``). For Wan2.1 the measured input is the *timestep
  embedding*, not a block's modulated input: ``temb`` [B, C] (``time_embedding`` output), or with ``use_ret_steps``
  its 6-way projection ``e`` [B, 6, C] (the tensor ``run_blocks`` receives). Per branch, between consecutive steps,
  ``d = mean|x_t - x_{t-1}| / mean|x_{t-1}|`` is rescaled by the fitted polynomial ``poly(d)`` (coefficients highest
  degree first, as ``np.poly1d``) and accumulated; the stack is skipped while the sum is ``< teacache_thresh`` and
  the sum restarts at 0 whenever the stack is computed. Always computed: steps 0..4 with ``use_ret_steps``, else
  step 0 and the last step.
- ``Mag`` (MagCache, Zehong-Ma/MagCache ``MagCache4Wan2.1``). A calibrated table ``ratio[s]`` per branch holds the
  mean over tokens of ``||residual_s|| / ||residual_{s-1}||``. Past the first ``int(N * retention_ratio)`` steps,
  each step multiplies an accumulated ratio by ``ratio[s]`` and adds ``|1 - accumulated ratio|`` to an error; the
  stack is skipped while that error is ``< magcache_thresh`` and at most ``magcache_K`` consecutive steps were
  skipped; otherwise it is computed and the three accumulators restart. ``magcache_calibration`` computes every
  step and records the ratios instead (``calibration_result()``).
- ``FirstBlock`` (first-block cache, as LightX2V's ``WanTransformerInferFirstBlock`` / diffusers'
  ``apply_first_block_cache``). Block 0 always runs; if its residual (every ``downsample_factor``-th channel)
  changed by ``mean|r0_t - r0_{t-1}| / mean|r0_{t-1}| < residual_diff_threshold`` since the previous step of the
  branch, blocks 1..N-1 are skipped and their cached residual is added; else they run and refresh it.

With a threshold of 0 no method ever skips, and the output is bit-identical to the uncached model.

Usage::

    hook = apply_feature_caching(dit, CacheConfig.from_lightx2v({"feature_caching": "Mag", ...}))
    hook.begin_generation(num_steps)
    for t in timesteps:
        hook.set_branch("cond");   v_c = dit(x, t, ctx)
        hook.set_branch("uncond"); v_u = dit(x, t, ctx_neg)
        ...
    hook.stats(); hook.remove()
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
import torch.nn as nn

from lightx2v.errors import UserError
from lightx2v.models.block_stack import ORDER_CACHE
from lightx2v.validate import check_bool, check_int, check_number, is_number

BRANCHES = ("cond", "uncond")
METHODS = ("NoCaching", "Tea", "Mag", "FirstBlock")
# LightX2V methods this version does not implement (named in the error message).
_NOT_IMPLEMENTED = ("Ada", "Custom", "TaylorSeer", "DualBlock", "DynamicBlock")

TEA_RET_STEPS = 5  # with use_ret_steps, TeaCache4Wan2.1 always computes the first 5 steps of each branch


# --- published constants --------------------------------------------------------------------------------------
# TeaCache polynomials (highest degree first), from ali-vilab/TeaCache TeaCache4Wan2.1/teacache_generate.py; the
# 1.3B / I2V ones are also in LightX2V's configs/caching/teacache/*.json as [ret_steps, no_ret_steps].

TEACACHE_COEFFICIENTS: dict[str, dict[str, tuple[float, ...]]] = {
    "wan2.1-t2v-1.3b": {
        "ret_steps": (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02),
        "no_ret_steps": (2.39676752e03, -1.31110545e03, 2.01331979e02, -8.29855975e00, 1.37887774e-01),
    },
    "wan2.1-t2v-14b": {
        "ret_steps": (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01),
        "no_ret_steps": (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404),
    },
    "wan2.1-i2v-14b-480p": {
        "ret_steps": (2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01),
        "no_ret_steps": (-3.02331670e02, 2.23948934e02, -5.25463970e01, 5.87348440e00, -2.01973289e-01),
    },
    "wan2.1-i2v-14b-720p": {
        "ret_steps": (8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02),
        "no_ret_steps": (-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683),
    },
}

# MagCache magnitude ratios per step, (cond, uncond), from Zehong-Ma/MagCache MagCache4Wan2.1/magcache_generate.py
# (stored there interleaved with a leading [1.0]*2); the 1.3B and I2V-480P tables equal LightX2V's
# configs/caching/magcache/*.json. Calibrated at 50 (T2V) / 40 (I2V) steps; other step counts use nearest
# interpolation, as MagCache does.

_MAG_RATIOS_T2V_14B = (  # (cond, uncond), 50 steps
    (
        1.0, 1.02504, 1.00025, 0.9985, 0.99779, 0.9966, 0.99482, 0.99467, 0.99664, 0.99434,
        0.99533, 0.99468, 0.99438, 0.99516, 0.99384, 0.99404, 0.99517, 0.99409, 0.99428, 0.99347,
        0.99418, 0.99271, 0.99313, 0.99215, 0.99218, 0.99216, 0.99163, 0.99138, 0.98982, 0.98996,
        0.9887, 0.98772, 0.98767, 0.98573, 0.98501, 0.9838, 0.98177, 0.98037, 0.97678, 0.97546,
        0.97184, 0.96711, 0.96349, 0.95629, 0.94926, 0.93964, 0.92511, 0.90693, 0.8796, 0.86111,
    ),
    (
        1.0, 1.03017, 1.00251, 0.99962, 0.99771, 0.99658, 0.99476, 0.99451, 0.99656, 0.99431,
        0.99545, 0.99465, 0.99434, 0.99517, 0.9938, 0.99401, 0.99516, 0.99408, 0.99426, 0.99343,
        0.99416, 0.99269, 0.99311, 0.99215, 0.99215, 0.99217, 0.99161, 0.99135, 0.9898, 0.98995,
        0.98866, 0.9877, 0.98765, 0.9857, 0.98498, 0.98376, 0.98173, 0.98035, 0.97677, 0.97543,
        0.97183, 0.96708, 0.96345, 0.95625, 0.94929, 0.93961, 0.92504, 0.90678, 0.87945, 0.86189,
    ),
)
_MAG_RATIOS_T2V_1_3B = (  # (cond, uncond), 50 steps
    (
        1.0, 1.0124, 1.00166, 0.99791, 0.99682, 0.99634, 0.99567, 0.99416, 0.99578, 0.9957,
        0.99511, 0.99535, 0.99552, 0.99541, 0.9954, 0.99489, 0.99518, 0.99484, 0.99481, 0.99415,
        0.99419, 0.99396, 0.99388, 0.99349, 0.99309, 0.9927, 0.99228, 0.99171, 0.99137, 0.99068,
        0.99005, 0.98944, 0.98849, 0.98758, 0.98644, 0.98504, 0.9836, 0.98202, 0.97977, 0.97717,
        0.9741, 0.97003, 0.96538, 0.9593, 0.95086, 0.94013, 0.92402, 0.90241, 0.86821, 0.81838,
    ),
    (
        1.0, 1.02213, 1.0041, 1.00061, 0.99762, 0.99685, 0.99586, 0.99422, 0.99575, 0.99563,
        0.99506, 0.99531, 0.99549, 0.99539, 0.99536, 0.99485, 0.99514, 0.99478, 0.99479, 0.99413,
        0.99416, 0.99393, 0.99386, 0.99349, 0.99304, 0.9927, 0.99226, 0.9917, 0.99135, 0.99063,
        0.99003, 0.98942, 0.98849, 0.98757, 0.98643, 0.98503, 0.98359, 0.98201, 0.97978, 0.97718,
        0.97411, 0.97002, 0.96541, 0.95933, 0.95089, 0.94019, 0.92414, 0.9026, 0.86868, 0.81939,
    ),
)
_MAG_RATIOS_I2V_480P = (  # (cond, uncond), 40 steps
    (
        1.0, 0.98783, 0.97559, 0.98311, 0.98202, 0.9888, 0.98762, 0.98957, 0.99052, 0.99383,
        0.98857, 0.99065, 0.98845, 0.99057, 0.98957, 0.98601, 0.98823, 0.98756, 0.98808, 0.98721,
        0.98571, 0.98543, 0.98157, 0.98411, 0.97952, 0.98149, 0.9774, 0.97825, 0.97355, 0.97085,
        0.97056, 0.96588, 0.96113, 0.9567, 0.94961, 0.93973, 0.93217, 0.91878, 0.90955, 0.92617,
    ),
    (
        1.0, 0.98993, 0.97593, 0.98319, 0.98225, 0.98878, 0.98759, 0.98971, 0.99043, 0.99384,
        0.9886, 0.99068, 0.98847, 0.99057, 0.98961, 0.9861, 0.98823, 0.98759, 0.98814, 0.98724,
        0.98572, 0.98544, 0.98165, 0.98413, 0.97953, 0.9815, 0.97742, 0.97826, 0.97361, 0.97087,
        0.97055, 0.96587, 0.96124, 0.95681, 0.94969, 0.93988, 0.93224, 0.91896, 0.90954, 0.92616,
    ),
)
_MAG_RATIOS_I2V_720P = (  # (cond, uncond), 40 steps
    (
        1.0, 0.99428, 0.98588, 0.98273, 0.99018, 0.98911, 0.98646, 0.99454, 0.9891, 0.99124,
        0.99102, 0.99215, 0.99515, 0.99576, 0.99068, 0.99097, 0.99166, 0.99041, 0.99201, 0.99101,
        0.98599, 0.98845, 0.98848, 0.98862, 0.98718, 0.98497, 0.98264, 0.98389, 0.97938, 0.97535,
        0.97498, 0.973, 0.96827, 0.96261, 0.95335, 0.94649, 0.93397, 0.91636, 0.89088, 0.8679,
    ),
    (
        1.0, 0.99498, 0.98621, 0.98281, 0.99023, 0.98917, 0.98652, 0.99456, 0.98909, 0.99127,
        0.99103, 0.99212, 0.99515, 0.99572, 0.99072, 0.99097, 0.99169, 0.99042, 0.99198, 0.99101,
        0.98603, 0.98844, 0.98851, 0.98857, 0.98719, 0.98497, 0.98263, 0.98393, 0.9794, 0.97536,
        0.97499, 0.97301, 0.96828, 0.96263, 0.9534, 0.94655, 0.93414, 0.9165, 0.89109, 0.86768,
    ),
)

MAGCACHE_RATIOS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "wan2.1-t2v-1.3b": _MAG_RATIOS_T2V_1_3B,
    "wan2.1-t2v-14b": _MAG_RATIOS_T2V_14B,
    "wan2.1-i2v-14b-480p": _MAG_RATIOS_I2V_480P,
    "wan2.1-i2v-14b-720p": _MAG_RATIOS_I2V_720P,
}


def _tea_preset(model: str, thresh: float) -> dict[str, Any]:
    c = TEACACHE_COEFFICIENTS[model]
    return {"feature_caching": "Tea", "teacache_thresh": thresh, "use_ret_steps": True,
            "coefficients": [list(c["ret_steps"]), list(c["no_ret_steps"])]}


def _mag_preset(model: str, k: int, thresh: float) -> dict[str, Any]:
    return {"feature_caching": "Mag", "magcache_calibration": False, "magcache_K": k, "magcache_thresh": thresh,
            "magcache_retention_ratio": 0.2, "magcache_ratios": [list(r) for r in MAGCACHE_RATIOS[model]]}


# Ready configs in LightX2V's keys (pass one to CacheConfig.from_lightx2v). Thresholds: LightX2V's shipped configs
# (Tea 0.26 with ret steps for T2V-1.3B, I2V-480P, I2V-720P; FirstBlock 0.02 with downsample 2 for T2V-1.3B);
# TeaCache's README / argparse default for T2V-14B (0.2); MagCache's README (K, thresh, retention) for Mag.
PRESETS: dict[str, dict[str, Any]] = {
    "tea-wan2.1-t2v-1.3b": _tea_preset("wan2.1-t2v-1.3b", 0.26),
    "tea-wan2.1-t2v-14b": _tea_preset("wan2.1-t2v-14b", 0.2),
    "tea-wan2.1-i2v-14b-480p": _tea_preset("wan2.1-i2v-14b-480p", 0.26),
    "tea-wan2.1-i2v-14b-720p": _tea_preset("wan2.1-i2v-14b-720p", 0.26),
    "mag-wan2.1-t2v-1.3b": _mag_preset("wan2.1-t2v-1.3b", 4, 0.12),
    "mag-wan2.1-t2v-14b": _mag_preset("wan2.1-t2v-14b", 6, 0.24),
    "mag-wan2.1-i2v-14b-480p": _mag_preset("wan2.1-i2v-14b-480p", 6, 0.24),
    "mag-wan2.1-i2v-14b-720p": _mag_preset("wan2.1-i2v-14b-720p", 6, 0.24),
    "firstblock-wan2.1-t2v-1.3b": {"feature_caching": "FirstBlock", "residual_diff_threshold": 0.02,
                                   "downsample_factor": 2},
}


# --- configs --------------------------------------------------------------------------------------------------

# method -> (required keys, optional keys); the dataclass fields below carry the same names.
_METHOD_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "NoCaching": ((), ()),
    "Tea": (("teacache_thresh", "coefficients", "use_ret_steps"), ()),
    "Mag": (("magcache_thresh", "magcache_K", "magcache_retention_ratio"), ("magcache_ratios", "magcache_calibration")),
    "FirstBlock": (("residual_diff_threshold",), ("downsample_factor",)),
}
# Every key a caching config may hold: a caller with a whole LightX2V config picks these out before from_lightx2v.
CACHE_KEYS = frozenset({"feature_caching"}.union(*(req + opt for req, opt in _METHOD_KEYS.values())))


def _numbers(name: str, seq: Any, positive: bool = False) -> tuple[float, ...]:
    if not isinstance(seq, (list, tuple)) or not seq or not all(is_number(v) and (v > 0 or not positive) for v in seq):
        what = "positive finite numbers" if positive else "finite numbers"
        raise UserError(f"{name} must be a non-empty list of {what}, got {seq!r}")
    return tuple(float(v) for v in seq)


def _is_nested(seq: Any) -> bool:
    return isinstance(seq, (list, tuple)) and bool(seq) and all(isinstance(v, (list, tuple)) for v in seq)


class CacheConfig:
    """Feature-caching config: one of the frozen dataclasses below; ``from_lightx2v`` builds one from LightX2V keys."""

    method: ClassVar[str]

    @staticmethod
    def from_lightx2v(d: dict[str, Any]) -> CacheConfig:
        """Build the config of ``d["feature_caching"]`` from LightX2V's keys; unknown or missing keys -> UserError.

        ``d`` holds only caching keys (``CACHE_KEYS``); without ``feature_caching`` (and no other key) it means
        NoCaching.
        """
        if not isinstance(d, dict):
            raise UserError(f"a caching config must be a dict of LightX2V keys, not {type(d).__name__}")
        method = d.get("feature_caching") or "NoCaching"  # absent / null: no caching
        if method not in METHODS:
            extra = ""
            if method in _NOT_IMPLEMENTED:
                extra = f" ({method!r} is a LightX2V method this version does not implement)"
            raise UserError(f"feature_caching={method!r} is not supported{extra}; "
                            f"allowed: {', '.join(repr(m) for m in METHODS)}")
        required, optional = _METHOD_KEYS[method]
        given = [k for k in d if k != "feature_caching"]
        unknown = [k for k in given if k not in required and k not in optional]
        if unknown:
            hints = []
            for k in unknown:
                owner = [m for m, (req, opt) in _METHOD_KEYS.items() if k in req or k in opt]
                if owner:
                    hints.append(f"{k!r} (a key of {owner[0]!r})")
                else:
                    close = difflib.get_close_matches(str(k), sorted(CACHE_KEYS), n=2)
                    hints.append(f"{k!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
            allowed = ", ".join(repr(k) for k in required + optional) or "none"
            raise UserError(f"unknown keys for feature_caching={method!r}: {', '.join(hints)}; its keys: {allowed}")
        missing = [k for k in required if k not in d]
        if missing:
            raise UserError(f"feature_caching={method!r} needs {', '.join(repr(k) for k in missing)}")
        cls = _CONFIG_CLASSES[method]
        return cls(**{k: d[k] for k in given})

    def to_lightx2v(self) -> dict[str, Any]:
        """The LightX2V keys of this config (``from_lightx2v`` of the result gives an equal config)."""
        out: dict[str, Any] = {"feature_caching": self.method}
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.name] = [list(x) for x in v] if _is_nested(v) else list(v) if isinstance(v, tuple) else v
        return out


@dataclass(frozen=True)
class NoCacheConfig(CacheConfig):
    method: ClassVar[str] = "NoCaching"


@dataclass(frozen=True)
class TeaCacheConfig(CacheConfig):
    """TeaCache. ``coefficients``: one polynomial (highest degree first), or LightX2V's pair
    ``[ret_steps_poly, no_ret_steps_poly]`` from which ``use_ret_steps`` picks; stored as the chosen polynomial."""

    method: ClassVar[str] = "Tea"
    teacache_thresh: float
    coefficients: tuple[float, ...]
    use_ret_steps: bool

    def __post_init__(self):
        check_number("teacache_thresh", self.teacache_thresh, lo=0.0)
        check_bool("use_ret_steps", self.use_ret_steps)
        c = self.coefficients
        if _is_nested(c):
            if len(c) != 2:
                raise UserError("coefficients as a list of lists must hold two polynomials [ret_steps, no_ret_steps], "
                                f"got {len(c)}")
            c = c[0] if self.use_ret_steps else c[1]
        object.__setattr__(self, "coefficients", _numbers("coefficients", c))


@dataclass(frozen=True)
class MagCacheConfig(CacheConfig):
    """MagCache. ``magcache_ratios``: LightX2V's ``[cond_ratios, uncond_ratios]`` (one list: both branches), or
    MagCache's flat list interleaved cond, uncond, cond, ...; stored as (cond, uncond). Not needed to calibrate."""

    method: ClassVar[str] = "Mag"
    magcache_thresh: float
    magcache_K: int
    magcache_retention_ratio: float
    magcache_ratios: tuple[tuple[float, ...], ...] = ()
    magcache_calibration: bool = False

    def __post_init__(self):
        check_number("magcache_thresh", self.magcache_thresh, lo=0.0)
        check_int("magcache_K", self.magcache_K, lo=0)
        check_number("magcache_retention_ratio", self.magcache_retention_ratio, lo=0.0, hi=1.0)
        check_bool("magcache_calibration", self.magcache_calibration)
        r = self.magcache_ratios
        if r is None or (isinstance(r, (list, tuple)) and len(r) == 0):
            if not self.magcache_calibration:
                raise UserError("feature_caching='Mag' needs 'magcache_ratios' (or magcache_calibration=true to "
                                "record them)")
            object.__setattr__(self, "magcache_ratios", ())
            return
        if _is_nested(r):
            if len(r) not in (1, 2):
                raise UserError(f"magcache_ratios must be [cond_ratios, uncond_ratios], got {len(r)} lists")
            cond = _numbers("magcache_ratios[0]", r[0], positive=True)
            uncond = _numbers("magcache_ratios[1]", r[1], positive=True) if len(r) == 2 else cond
        else:
            flat = _numbers("magcache_ratios", r, positive=True)
            if len(flat) % 2:
                raise UserError(f"magcache_ratios as a flat list is MagCache's interleaved cond/uncond table and "
                                f"needs an even length, got {len(flat)}")
            cond, uncond = flat[0::2], flat[1::2]
        object.__setattr__(self, "magcache_ratios", (cond, uncond))


@dataclass(frozen=True)
class FirstBlockCacheConfig(CacheConfig):
    method: ClassVar[str] = "FirstBlock"
    residual_diff_threshold: float
    downsample_factor: int = 1  # compare every n-th channel of block 0's residual (LightX2V ships 2)

    def __post_init__(self):
        check_number("residual_diff_threshold", self.residual_diff_threshold, lo=0.0)
        check_int("downsample_factor", self.downsample_factor, lo=1)


_CONFIG_CLASSES: dict[str, type] = {"NoCaching": NoCacheConfig, "Tea": TeaCacheConfig, "Mag": MagCacheConfig,
                                    "FirstBlock": FirstBlockCacheConfig}


# --- hooks ----------------------------------------------------------------------------------------------------

def _polyval(coefficients: Sequence[float], x: float) -> float:
    """Horner's rule, highest degree first (what ``np.poly1d(coefficients)(x)`` computes)."""
    y = 0.0
    for c in coefficients:
        y = y * x + c
    return y


def _rel_l1(x: torch.Tensor, prev: torch.Tensor) -> float:
    """mean|x - prev| / mean|prev| (NaN when prev is all zeros: callers then compute, never skip)."""
    return ((x - prev).abs().mean() / prev.abs().mean()).item()


def nearest_interp(values: Sequence[float], n: int) -> tuple[float, ...]:
    """Resample a per-step table to ``n`` steps by nearest index (MagCache's rule: index round(i * (len-1)/(n-1)))."""
    if n == 1:
        return (values[-1],)
    scale = (len(values) - 1) / (n - 1)
    return tuple(values[round(i * scale)] for i in range(n))


@dataclass
class _BranchState:
    """Per-branch state shared by all methods; each method adds its own fields."""

    step: int = 0  # DiT calls of this branch since begin_generation
    computed: int = 0
    skipped_steps: list[int] = field(default_factory=list)


class CacheHook:
    """Handle of an installed caching hook: select the branch, start a generation, read stats, remove.

    Attaches to the model's block stack (``model.block_stack``, order ``ORDER_CACHE``: outside any sequence-parallel
    split, so every rank sees whole sequences and takes the same decision); nothing of the model is replaced.
    ``remove()`` detaches it. Not thread-safe: one hook serves one generation at a time.
    """

    method: ClassVar[str] = "NoCaching"
    _needs_num_steps: ClassVar[bool] = False  # Tea and Mag need the step count (first/last steps, retention)

    def __init__(self, model: nn.Module, cfg: CacheConfig):
        self.model = model
        self.cfg = cfg
        self.num_steps: int | None = None
        self._branch = "cond"
        self._states: dict[str, _BranchState] = {}
        self._attached = False
        self.reset()

    # -- state --
    def _new_state(self) -> _BranchState:
        return _BranchState()

    def reset(self) -> None:
        """Forget everything: cached residuals, accumulators, step counters, stats, calibration records."""
        self.num_steps = None
        self._branch = "cond"
        self._states = {b: self._new_state() for b in BRANCHES}

    def begin_generation(self, num_steps: int) -> None:
        """Start a generation of ``num_steps`` denoising steps (each branch calls the DiT once per step)."""
        check_int("num_steps", num_steps, lo=1)
        self.reset()
        self.num_steps = num_steps

    def set_branch(self, name: str) -> None:
        """Select the branch ("cond" or "uncond") whose cache the next DiT forward uses."""
        if name not in BRANCHES:
            raise ValueError(f"branch must be one of {BRANCHES}, got {name!r}")
        self._branch = name

    @property
    def branch(self) -> str:
        return self._branch

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per branch: block-stack evaluations computed, skipped, and the indices of the skipped steps.

        (FirstBlock: "skipped" counts the steps where only block 0 ran.)
        """
        return {b: {"computed": s.computed, "skipped": len(s.skipped_steps), "skipped_steps": list(s.skipped_steps)}
                for b, s in self._states.items()}

    # -- installation --
    def _attach(self) -> None:
        stack = getattr(self.model, "block_stack", None)
        if stack is None:
            raise TypeError(f"{type(self.model).__name__} has no block_stack (lightx2v.models.block_stack.BlockStack) "
                            "to hook")
        if any(isinstance(h, CacheHook) for h in stack.hooks):
            raise RuntimeError("feature caching is already applied to this model; remove() that hook first")
        stack.add_hook(self, order=ORDER_CACHE)
        self._attached = True

    def remove(self) -> None:
        """Detach from the block stack; calling it twice is harmless."""
        if self._attached:
            self.model.block_stack.remove_hook(self)
            self._attached = False

    # -- the step --
    def __call__(self, inner, tokens, args, start: int = 0, stop: int | None = None):
        if (start, stop) != (0, None):  # an outer hook runs part of the stack: not a step of ours
            return inner(tokens, args, start, stop)
        st = self._states[self._branch]
        step = st.step
        if self.num_steps is None and self._needs_num_steps:
            raise RuntimeError(f"{self.method} caching needs begin_generation(num_steps) before the first step")
        if self.num_steps is not None and step >= self.num_steps:
            raise RuntimeError(f"branch {self._branch!r} ran more than the {self.num_steps} steps announced by "
                               "begin_generation(); call it again before each generation")
        out, skipped = self._step(self._branch, st, step, inner, tokens, args)
        st.step += 1
        if skipped:
            st.skipped_steps.append(step)
        else:
            st.computed += 1
        return out

    def _step(self, branch, st, step, inner, tokens, args) -> tuple[torch.Tensor, bool]:
        """One evaluation of the stack for ``branch``: (output tokens, skipped?). ``inner(tokens, args[, start,
        stop])`` runs the blocks (through any hook inside this one); ``args`` is the model's per-forward block inputs
        (``modulation``: the time projection e; ``temb``: the time embedding)."""
        raise NotImplementedError


class NoCacheHook(CacheHook):
    """``NoCaching``: attaches nothing; the branch/generation calls are accepted and ignored; ``stats()`` is empty."""

    def stats(self) -> dict[str, dict[str, Any]]:
        return {}


@dataclass
class _TeaState(_BranchState):
    prev_input: torch.Tensor | None = None  # temb [B, C] or e [B, 6, C] of the previous step
    accumulated: float = 0.0
    residual: torch.Tensor | None = None  # [B, L, C]


class TeaCacheHook(CacheHook):
    method = "Tea"
    _needs_num_steps = True
    cfg: TeaCacheConfig

    def __init__(self, model: nn.Module, cfg: TeaCacheConfig):
        super().__init__(model, cfg)
        self._attach()

    def _new_state(self) -> _TeaState:
        return _TeaState()

    def _must_compute(self, step: int) -> bool:
        if self.cfg.use_ret_steps:
            return step < TEA_RET_STEPS
        return step == 0 or step == self.num_steps - 1

    def _step(self, branch, st: _TeaState, step, inner, tokens, args):
        # the measured input: the time projection e (use_ret_steps) or the time embedding temb
        x = args.modulation if self.cfg.use_ret_steps else args.temb
        compute = True
        if not self._must_compute(step) and st.prev_input is not None and st.residual is not None:
            rescaled = _polyval(self.cfg.coefficients, _rel_l1(x, st.prev_input))
            # A negative value of the fitted polynomial counts as 0: a distance never buys extra skips, and a
            # threshold of 0 never skips. NaN (previous input all zeros) forces a compute.
            st.accumulated += math.inf if math.isnan(rescaled) else max(0.0, rescaled)
            compute = not st.accumulated < self.cfg.teacache_thresh  # NaN -> compute
        st.prev_input = x.detach().clone()
        if not compute:
            return tokens + st.residual, True
        st.accumulated = 0.0
        inp = tokens.clone()  # the blocks update the token stream in place
        out = inner(tokens, args)
        st.residual = out - inp
        return out, False


@dataclass
class _MagState(_BranchState):
    accumulated_ratio: float = 1.0
    accumulated_steps: int = 0  # consecutive skips plus the current step
    accumulated_err: float = 0.0
    residual: torch.Tensor | None = None  # [B, L, C]
    ratios: list[float] = field(default_factory=list)  # calibration record, one per step


class MagCacheHook(CacheHook):
    method = "Mag"
    _needs_num_steps = True
    cfg: MagCacheConfig

    def __init__(self, model: nn.Module, cfg: MagCacheConfig):
        super().__init__(model, cfg)
        self._tables: dict[str, tuple[float, ...]] = {}
        self._attach()

    def _new_state(self) -> _MagState:
        return _MagState()

    def begin_generation(self, num_steps: int) -> None:
        super().begin_generation(num_steps)
        if not self.cfg.magcache_calibration:
            self._tables = {}
            for branch, table in zip(BRANCHES, self.cfg.magcache_ratios):
                self._tables[branch] = table if len(table) == num_steps else nearest_interp(table, num_steps)

    def calibration_result(self) -> list[list[float]]:
        """The recorded ratios, ``[cond, uncond]`` (``[cond]`` without CFG), rounded to 5 digits as MagCache does:
        paste as ``magcache_ratios``."""
        if not self.cfg.magcache_calibration:
            raise RuntimeError("calibration_result() needs a config with magcache_calibration=true")
        return [[round(v, 5) for v in self._states[b].ratios] for b in BRANCHES if self._states[b].ratios]

    def _step(self, branch, st: _MagState, step, inner, tokens, args):
        cfg = self.cfg
        if (not cfg.magcache_calibration and st.residual is not None
                and step >= int(self.num_steps * cfg.magcache_retention_ratio)):
            st.accumulated_ratio *= self._tables[branch][step]  # residual magnitude now / at the cached step
            st.accumulated_steps += 1
            st.accumulated_err += abs(1.0 - st.accumulated_ratio)
            if st.accumulated_err < cfg.magcache_thresh and st.accumulated_steps <= cfg.magcache_K:
                return tokens + st.residual, True
            st.accumulated_ratio, st.accumulated_steps, st.accumulated_err = 1.0, 0, 0.0
        inp = tokens.clone()  # the blocks update the token stream in place
        out = inner(tokens, args)
        residual = out - inp
        del inp
        if cfg.magcache_calibration:
            if st.residual is None:
                st.ratios.append(1.0)
            else:  # mean over tokens of the ratio of per-token residual norms (over channels)
                st.ratios.append((residual.float().norm(dim=-1) / st.residual.float().norm(dim=-1)).mean().item())
        st.residual = residual
        return out, False


@dataclass
class _FirstBlockState(_BranchState):
    prev_first_residual: torch.Tensor | None = None  # block 0's residual, channels ::downsample_factor
    rest_residual: torch.Tensor | None = None  # blocks 1..N-1: output - block 0's output, [B, L, C]


class FirstBlockCacheHook(CacheHook):
    """Runs the stack in two parts, block 0 and blocks 1..N-1 (through any hook inside this one)."""

    method = "FirstBlock"
    cfg: FirstBlockCacheConfig

    def __init__(self, model: nn.Module, cfg: FirstBlockCacheConfig):
        super().__init__(model, cfg)
        if len(getattr(model, "block_stack", ())) < 2:
            raise TypeError("first-block caching needs a block stack (model.block_stack) of at least 2 blocks")
        self._attach()

    def _new_state(self) -> _FirstBlockState:
        return _FirstBlockState()

    def _step(self, branch, st: _FirstBlockState, step, inner, tokens, args):
        inp = tokens.clone()  # the blocks update the token stream in place
        h = inner(tokens, args, 0, 1)
        f = self.cfg.downsample_factor
        r0 = h - inp if f == 1 else (h - inp)[..., ::f].contiguous()
        del inp
        skip = False
        if st.prev_first_residual is not None and st.rest_residual is not None:
            # Compared with the previous step of the branch (LightX2V), computed or not.
            skip = _rel_l1(r0, st.prev_first_residual) < self.cfg.residual_diff_threshold  # NaN -> compute
        st.prev_first_residual = r0
        if skip:
            return h + st.rest_residual, True
        h0 = h.clone()
        x = inner(h, args, 1, None)
        st.rest_residual = x - h0
        return x, False


_HOOK_CLASSES: dict[type, type] = {NoCacheConfig: NoCacheHook, TeaCacheConfig: TeaCacheHook,
                                   MagCacheConfig: MagCacheHook, FirstBlockCacheConfig: FirstBlockCacheHook}


def apply_feature_caching(model: nn.Module, cfg: CacheConfig | dict[str, Any]) -> CacheHook:
    """Attach the caching method of ``cfg`` (a CacheConfig, or a dict of LightX2V keys) to ``model``'s block stack
    (any model with a ``block_stack`` whose args carry ``modulation`` and ``temb``). NoCaching returns a handle that
    does nothing."""
    if isinstance(cfg, dict):
        cfg = CacheConfig.from_lightx2v(cfg)
    hook_cls = _HOOK_CLASSES.get(type(cfg))
    if hook_cls is None:
        raise TypeError(f"not a caching config: {cfg!r}")
    return hook_cls(model, cfg)


__all__ = [
    "BRANCHES",
    "CACHE_KEYS",
    "MAGCACHE_RATIOS",
    "METHODS",
    "PRESETS",
    "TEACACHE_COEFFICIENTS",
    "CacheConfig",
    "CacheHook",
    "FirstBlockCacheConfig",
    "FirstBlockCacheHook",
    "MagCacheConfig",
    "MagCacheHook",
    "NoCacheConfig",
    "NoCacheHook",
    "TeaCacheConfig",
    "TeaCacheHook",
    "apply_feature_caching",
    "nearest_interp",
]
