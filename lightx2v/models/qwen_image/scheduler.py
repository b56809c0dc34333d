"""Qwen-Image's flow-matching Euler sampler with its resolution-dependent shift.

``lightx2v.schedulers.euler`` is Wan's schedule (a fixed shift applied twice to the end point); Qwen-Image's differs,
so it lives here. The release's ``scheduler/scheduler_config.json`` configures diffusers'
``FlowMatchEulerDiscreteScheduler`` with dynamic shifting, and the pipelines call it as follows (reproduced exactly,
float32 rounding included):

* base sigmas ``linspace(1, 1/n, n)`` (float32);
* ``mu = base_shift + (max_shift - base_shift) * (seq_len - base_seq_len) / (max_seq_len - base_seq_len)`` (linear
  in the number of image tokens being generated; 0.5..0.9 over 256..8192 tokens in the release) and the exponential
  time shift ``s -> e^mu / (e^mu + (1/s - 1))``;
* ``shift_terminal`` (0.02): the schedule stretched so that its last sigma is 0.02 (``1 - (1 - s) * (1 - 0.02) /
  (1 - s_last)``);
* a final sigma 0 appended; timesteps = sigmas * 1000; the DiT sees ``timestep / 1000``.

One Euler step: ``x + (sigma_next - sigma) * v`` in float32.

``sample_shift`` (LightX2V's key) replaces the resolution-dependent shift by a fixed one, as LightX2V's Qwen-Image
scheduler does: ``s -> shift * s / (1 + (shift - 1) * s)`` on the same base sigmas, no terminal stretch.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Mapping

import numpy as np
import torch

from lightx2v.errors import CheckpointError, UserError
from lightx2v.schedulers.euler import check_num_steps


@dataclass(frozen=True)
class FlowMatchConfig:
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` settings that the Qwen-Image releases use (defaults: theirs)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = True
    base_shift: float = 0.5
    max_shift: float = 0.9
    base_image_seq_len: int = 256
    max_image_seq_len: int = 8192
    shift_terminal: float | None = 0.02
    time_shift_type: str = "exponential"

    def __post_init__(self) -> None:
        if self.time_shift_type not in ("exponential", "linear"):
            raise CheckpointError(f"scheduler time_shift_type={self.time_shift_type!r}: allowed exponential, linear")
        if self.max_image_seq_len == self.base_image_seq_len:
            raise CheckpointError("scheduler max_image_seq_len must differ from base_image_seq_len")
        if self.shift_terminal is not None and not 0 <= self.shift_terminal < 1:
            raise CheckpointError(f"scheduler shift_terminal={self.shift_terminal!r} must be in [0, 1)")

    # diffusers keys that must keep their default (the features are not implemented); _class_name etc. are skipped
    _OFF: ClassVar[Any] = (("use_karras_sigmas", False), ("use_exponential_sigmas", False), ("use_beta_sigmas", False),
                 ("invert_sigmas", False), ("stochastic_sampling", False))

    @classmethod
    def from_diffusers_config(cls, d: Mapping[str, Any]) -> FlowMatchConfig:
        names = {f.name for f in fields(cls)}
        off = dict(cls._OFF)
        kwargs, bad = {}, []
        for key, value in d.items():
            if key.startswith("_"):
                continue
            if key in off:
                if value not in (off[key], None):
                    bad.append(f"{key}={value!r} (not supported)")
            elif key in names:
                kwargs[key] = value
            else:
                bad.append(f"{key}={value!r} (unknown key)")
        if bad:
            raise CheckpointError("unsupported Qwen-Image scheduler config: " + ", ".join(bad))
        return cls(**kwargs)

    def to_diffusers_config(self) -> dict[str, Any]:
        d = {"_class_name": "FlowMatchEulerDiscreteScheduler"}
        d.update({f.name: getattr(self, f.name) for f in fields(self)})
        d.update(dict(self._OFF))
        return d

    def mu(self, image_seq_len: int) -> float:
        """The pipelines' ``calculate_shift``: linear in the image token count."""
        m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        b = self.base_shift - m * self.base_image_seq_len
        return image_seq_len * m + b


def check_sample_shift(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise UserError(f"sample_shift={value!r} must be a number > 0 (or null: the release's resolution-dependent "
                        "shift)")
    return float(value)


class QwenImageScheduler:
    """Flow-matching Euler over the schedule described in the module docstring.

    Usage::

        sched = QwenImageScheduler(FlowMatchConfig())
        sched.set_timesteps(50, image_seq_len=N)
        for t in sched.timesteps:            # float32, in [0, 1000]
            x = sched.step(model(x, t / 1000), x)
    """

    def __init__(self, config: FlowMatchConfig | None = None) -> None:
        self.config = config or FlowMatchConfig()
        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0)
        self.num_inference_steps = 0
        self._step = 0

    def set_timesteps(self, num_inference_steps: int, image_seq_len: int, sample_shift: float | None = None) -> None:
        """``image_seq_len``: tokens of the image being generated (condition images not counted)."""
        n = check_num_steps(num_inference_steps)
        sample_shift = check_sample_shift(sample_shift)
        cfg = self.config
        base = np.linspace(1.0, 1 / n, n)
        if sample_shift is not None:  # LightX2V: a fixed shift on the float32 base sigmas
            s = torch.from_numpy(base).float()
            sigmas = sample_shift / (sample_shift + (1.0 / s - 1.0))
        else:
            s = base.astype(np.float32)  # the rest in numpy float32, as diffusers computes it
            if cfg.use_dynamic_shifting:
                mu = cfg.mu(image_seq_len)
                if cfg.time_shift_type == "exponential":
                    s = math.exp(mu) / (math.exp(mu) + (1 / s - 1) ** 1.0)
                else:
                    s = mu / (mu + (1 / s - 1) ** 1.0)
            else:
                s = cfg.shift * s / (1 + (cfg.shift - 1) * s)
            if cfg.shift_terminal:
                if n == 1:
                    raise UserError("infer_steps must be >= 2 with the release's scheduler (its shift_terminal "
                                    "stretches the schedule between the first and the last sigma); or set sample_shift")
                one_minus = 1 - s
                s = 1 - (one_minus / (one_minus[-1] / (1 - cfg.shift_terminal)))
            sigmas = torch.from_numpy(np.asarray(s)).to(torch.float32)
        self.timesteps = sigmas * cfg.num_train_timesteps
        self.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        self.num_inference_steps = n
        self._step = 0

    def reset(self) -> None:
        self._step = 0

    @property
    def step_index(self) -> int:
        return self._step

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """sample + (sigma_next - sigma) * velocity, in float32 (returns float32)."""
        if self.num_inference_steps == 0:
            raise RuntimeError("QwenImageScheduler.step() called before set_timesteps()")
        i = self._step
        if i >= self.num_inference_steps:
            raise RuntimeError(f"QwenImageScheduler.step() called {i + 1} times for {self.num_inference_steps} steps")
        dt = self.sigmas[i + 1] - self.sigmas[i]  # float32 0-d tensor, as the reference
        self._step += 1
        return sample.float() + dt.to(sample.device) * velocity.float()
