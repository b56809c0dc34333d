"""Sampler for step-distilled Wan models (e.g. LightX2V's 4-step, CFG-free distillations).

The schedule is a 1000-point flow-matching schedule ``sigma_i = 1 - i/1000`` (i = 0..999) shifted by ``shift``
(``s -> shift*s / (1 + (shift-1)*s)``); the model is evaluated at the points named by ``denoising_step_list``
(training timesteps, e.g. [1000, 750, 500, 250] -> indices 0, 250, 500, 750). Each step predicts the clean sample
``x0 = x - sigma * v`` and, except at the last step, moves it back to the next sigma along the same velocity:
``x = x0 + sigma_next * v`` (deterministic: no fresh noise). This is LightX2V's update
(``WanStepDistillScheduler.step_post``, used unchanged by ``Wan22StepDistillScheduler`` for
``wan2.2_moe_distill``), computed in float32 in the same order. The only randomness is the initial noise.
"""

from __future__ import annotations

import torch

from lightx2v.errors import UserError
from lightx2v.schedulers.euler import _next_step_index, check_scheduler_args, shift_sigmas


def check_step_list(steps, num_train_timesteps: int = 1000) -> tuple[int, ...]:
    if not isinstance(steps, (list, tuple)) or not steps:
        raise UserError(f"denoising_step_list={steps!r} must be a non-empty list of timesteps")
    for s in steps:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 < s <= num_train_timesteps:
            raise UserError(f"denoising_step_list entry {s!r} must be an integer in 1..{num_train_timesteps}")
    if any(a <= b for a, b in zip(steps, steps[1:])):
        raise UserError(f"denoising_step_list={list(steps)} must be strictly decreasing (e.g. [1000, 750, 500, 250])")
    return tuple(steps)


class StepDistillScheduler:
    def __init__(self, denoising_step_list, shift: float = 5.0, num_train_timesteps: int = 1000):
        self.shift, self.num_train_timesteps = check_scheduler_args(shift, num_train_timesteps)
        self.step_list = check_step_list(denoising_step_list, num_train_timesteps)
        self.num_inference_steps = len(self.step_list)
        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0)
        self._step = 0

    def set_timesteps(self, num_inference_steps: int | None = None, device=None) -> None:
        n = len(self.step_list)
        if num_inference_steps is not None and num_inference_steps != n:
            raise UserError(f"infer_steps={num_inference_steps} does not match denoising_step_list "
                            f"{list(self.step_list)} ({n} steps)")
        big_n = self.num_train_timesteps
        full = torch.linspace(1.0, 0.0, big_n + 1)[:-1]  # float32, as the reference computes it
        full = shift_sigmas(full, self.shift)
        index = [big_n - s for s in self.step_list]
        self.sigmas = torch.cat([full[index], full.new_zeros(1)])  # CPU; the final 0 marks the clean end
        self.timesteps = (full * big_n)[index].to(device)
        self._step = 0

    def reset(self) -> None:
        self._step = 0

    @property
    def step_index(self) -> int:
        return self._step

    def restart_at(self, step_index: int) -> None:
        self._step = step_index

    def step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """One update: ``model_output`` (velocity v) and ``sample`` (x) of the same shape, e.g. [B, C, F, H, W]."""
        if not self.sigmas.numel():
            raise RuntimeError("StepDistillScheduler.step() called before set_timesteps()")
        i = _next_step_index(self)
        v = model_output.float()
        x = sample.float() - self.sigmas[i].item() * v  # the clean prediction x0
        if i < self.num_inference_steps - 1:
            x = x + v * self.sigmas[i + 1].item()
        self._step += 1
        return x.to(sample.dtype)
