"""HunyuanVideo-1.5's sampler: flow-matching Euler over an explicit list of (unshifted) sigmas.

The reference pipelines pass ``sigmas = linspace(1, 0, steps + 1)[:-1]`` to diffusers' ``FlowMatchEulerDiscreteScheduler``,
which shifts them (``s -> shift * s / (1 + (shift - 1) * s)``, in float32), appends a final 0 and steps
``x <- x + (sigma_next - sigma) * v``. The model sees the timestep ``sigma * 1000``.

LightX2V's step-distilled HunyuanVideo-1.5 (``denoising_step_list``, e.g. [1000, 750, 500, 250]) evaluates the
1000-point schedule ``1 - i/1000`` shifted by ``sample_shift`` at the listed training timesteps and updates
``x0 = x - sigma * v; x <- x0 + sigma_next * v`` (no fresh noise), i.e. the same Euler step on the sigmas
``step / 1000`` (here: [1.0, 0.75, 0.5, 0.25]) shifted in the same way (table entry ``1000 - step`` is
``1 - (1000 - step) / 1000``). Both cases are :class:`FlowSigmaEuler`;
only the sigma list differs (:func:`default_sigmas`, :func:`distilled_sigmas`).

lightx2v/schedulers/euler.py is diffusers' *default* schedule (one that shifts the end point twice); this one takes the
list the HunyuanVideo-1.5 pipelines give, so it is kept apart.
"""

from __future__ import annotations

import numpy as np
import torch

from lightx2v.schedulers.distill import check_step_list
from lightx2v.schedulers.euler import check_num_steps, check_scheduler_args

NUM_TRAIN_TIMESTEPS = 1000


def default_sigmas(num_steps: int) -> np.ndarray:
    """The reference pipelines' unshifted sigmas: ``linspace(1, 0, num_steps + 1)[:-1]`` (float64)."""
    n = check_num_steps(num_steps)
    return np.linspace(1.0, 0.0, n + 1)[:-1]


def distilled_sigmas(denoising_step_list) -> np.ndarray:
    """Unshifted sigmas of a step-distilled model: ``t / 1000`` for each listed training timestep ``t``."""
    steps = check_step_list(list(denoising_step_list) if isinstance(denoising_step_list, tuple)
                            else denoising_step_list, NUM_TRAIN_TIMESTEPS)
    return np.asarray(steps, dtype=np.float64) / NUM_TRAIN_TIMESTEPS


class FlowSigmaEuler:
    """Euler sampler over ``sigmas`` (unshifted, decreasing, in (0, 1]) shifted by ``shift``.

    ``timesteps`` (float32, ``[n]``) are what the DiT is given; ``sigmas`` (float32, ``[n + 1]``, ending at 0) stay on
    the CPU. ``step(v, x)`` moves ``x`` from the current sigma to the next one in float32 and returns ``v``'s dtype,
    as diffusers' scheduler does."""

    def __init__(self, sigmas, shift: float):
        self.shift, _ = check_scheduler_args(shift, NUM_TRAIN_TIMESTEPS)
        s = np.asarray(sigmas, dtype=np.float64).astype(np.float32)
        if s.ndim != 1 or not len(s) or not np.all(s > 0) or not np.all(s <= 1) or np.any(np.diff(s) >= 0):
            raise ValueError(f"sigmas must be a non-empty decreasing list in (0, 1], got {list(sigmas)}")
        s = self.shift * s / (1 + (self.shift - 1) * s)  # float32 throughout, as the reference
        shifted = torch.from_numpy(s).to(torch.float32)
        self.timesteps = shifted * NUM_TRAIN_TIMESTEPS
        self.sigmas = torch.cat([shifted, torch.zeros(1)])
        self.num_inference_steps = len(s)
        self._step = 0

    def reset(self) -> None:
        self._step = 0

    @property
    def step_index(self) -> int:
        return self._step

    def step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        i = self._step
        if i >= self.num_inference_steps:
            raise RuntimeError(f"step() called {i + 1} times for {self.num_inference_steps} steps; call reset()")
        dt = self.sigmas[i + 1] - self.sigmas[i]  # float32 scalar tensor
        prev = sample.float() + dt.to(sample.device) * model_output.float()
        self._step += 1
        return prev.to(model_output.dtype)
