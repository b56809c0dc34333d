"""Flow-matching Euler scheduler.

A flow model predicts the velocity ``v = noise - x0`` of the straight path
``x_sigma = (1 - sigma) * x0 + sigma * noise``, so one Euler step from ``sigma`` to ``sigma_next`` is
``x + (sigma_next - sigma) * v``.

The schedule reproduces diffusers' ``FlowMatchEulerDiscreteScheduler(shift=shift)`` with default settings, including its
quirk that the last sigma is shifted twice (the end point comes from the already shifted training schedule and the
inference schedule is shifted again).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from lightx2v.errors import UserError


def check_num_steps(num_inference_steps) -> int:
    """Return ``num_inference_steps`` as an int, or raise :class:`UserError` unless it is an integer >= 1."""
    if (
        isinstance(num_inference_steps, bool)
        or not isinstance(num_inference_steps, numbers.Integral)
        or num_inference_steps < 1
    ):
        raise UserError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    return int(num_inference_steps)


def check_scheduler_args(shift, num_train_timesteps) -> tuple[float, int]:
    """Validate the arguments every flow scheduler takes; return them as (float, int)."""
    if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not (math.isfinite(shift) and shift > 0):
        raise UserError(f"shift must be a finite number > 0, got {shift!r}")
    if (
        isinstance(num_train_timesteps, bool)
        or not isinstance(num_train_timesteps, numbers.Integral)
        or num_train_timesteps < 1
    ):
        raise UserError(f"num_train_timesteps must be an integer >= 1, got {num_train_timesteps!r}")
    return float(shift), int(num_train_timesteps)


def shift_sigmas(sigmas, shift: float):
    """The flow time shift ``shift * s / (1 + (shift - 1) * s)``: shift > 1 spends more steps at high noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class FlowEulerScheduler:
    """Euler sampler for flow-matching (velocity-predicting) models.

    Usage::

        sched = FlowEulerScheduler(shift=5.0)
        sched.set_timesteps(50)
        for t in sched.timesteps:
            x = sched.step(model(x, t), x)
    """

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 5.0):
        self.shift, self.num_train_timesteps = check_scheduler_args(shift, num_train_timesteps)
        self.num_inference_steps = 0
        self.timesteps = torch.empty(0, dtype=torch.float32)
        self.sigmas = torch.empty(0, dtype=torch.float32)
        self.reset()

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Build the schedule: ``timesteps`` (``num_inference_steps``) and ``sigmas`` (one more, ending at 0)."""
        n = check_num_steps(num_inference_steps)
        big_n = self.num_train_timesteps
        # End points of the shifted training schedule, computed in float32 like diffusers does.
        ends = shift_sigmas(torch.tensor([float(big_n), 1.0]) / big_n, self.shift)
        sigma_max, sigma_min = ends.tolist()
        sigmas = shift_sigmas(np.linspace(sigma_max, sigma_min, n), self.shift)  # float64
        sigmas = torch.from_numpy(sigmas).to(torch.float32)
        self.timesteps = (sigmas * big_n).to(device)
        self.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])  # stays on the CPU
        self.num_inference_steps = n
        self.reset()

    def reset(self) -> None:
        """Start again from the first timestep (``set_timesteps`` calls this)."""
        self._step = 0

    @property
    def step_index(self) -> int:
        """Index of the next step to take."""
        return self._step

    def restart_at(self, step_index: int) -> None:
        """Continue at ``step_index`` of the current schedule (Euler keeps no history)."""
        if not 0 <= step_index < self.num_inference_steps:
            raise RuntimeError(f"restart_at({step_index}) outside 0..{self.num_inference_steps - 1}")
        self._step = step_index

    def step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Move ``sample`` from the current sigma to the next one; returns a tensor of ``sample``'s dtype."""
        i = _next_step_index(self)
        dt = (self.sigmas[i + 1] - self.sigmas[i]).item()  # float32 value, exact as a Python float
        prev = sample.float() + dt * model_output.float()
        self._step += 1
        return prev.to(sample.dtype)


def _next_step_index(sched) -> int:
    """Index of the step about to be taken; raises RuntimeError if there is none left."""
    if sched.num_inference_steps == 0:
        raise RuntimeError(f"{type(sched).__name__}.step() called before set_timesteps()")
    if sched._step >= sched.num_inference_steps:
        raise RuntimeError(
            f"{type(sched).__name__}.step() called {sched._step + 1} times for {sched.num_inference_steps} "
            "inference steps; call reset() or set_timesteps() to start again"
        )
    return sched._step
