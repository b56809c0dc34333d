"""Sampler for step-distilled Wan models (e.g. LightX2V's 4-step, CFG-free distillations).

The schedule is a 1000-point flow-matching schedule ``sigma_i = 1 - i/1000`` (i = 0..999) shifted by ``shift``
(``s -> shift*s / (1 + (shift-1)*s)``); the model is evaluated at the points named by ``denoising_step_list``
(training timesteps, e.g. [1000, 750, 500, 250] -> indices 0, 250, 500, 750). Each step predicts the clean sample
``x0 = x - sigma * v`` and, except at the last step, re-noises it to the next sigma with fresh Gaussian noise:
``x = (1 - sigma_next) * x0 + sigma_next * noise``. This is the update LightX2V's step-distill scheduler uses.
The fresh noise comes from the generator passed in (the runner passes the CPU generator that drew the initial
noise), so a seed fixes the whole trajectory on every device.
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
    def __init__(self, denoising_step_list, shift: float = 5.0, num_train_timesteps: int = 1000,
                 generator: torch.Generator | None = None):
        self.shift, self.num_train_timesteps = check_scheduler_args(shift, num_train_timesteps)
        self.step_list = check_step_list(denoising_step_list, num_train_timesteps)
        self.generator = generator
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
        if not self.sigmas.numel():
            raise RuntimeError("StepDistillScheduler.step() called before set_timesteps()")
        i = _next_step_index(self)
        x0 = sample.float() - self.sigmas[i].item() * model_output.float()
        if i < self.num_inference_steps - 1:
            s_next = self.sigmas[i + 1].item()
            noise = torch.randn(x0.shape, generator=self.generator, dtype=torch.float32).to(x0.device)
            x0 = (1 - s_next) * x0 + s_next * noise
        self._step += 1
        return x0.to(sample.dtype)
