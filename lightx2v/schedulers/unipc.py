"""Flow-matching UniPC multistep scheduler (the sampler Wan2.1 ships with).

UniPC (Zhao et al. 2023, https://arxiv.org/abs/2302.04867) is a multistep predictor-corrector ODE solver. With a flow
model the path is ``x_sigma = alpha * x0 + sigma * noise`` with ``alpha = 1 - sigma``; the velocity prediction ``v``
gives the data prediction ``x0 = x - sigma * v``, and the solver works in ``lambda = log(alpha / sigma)``.

Each step
  1. corrects the sample the previous step produced (UniC), using the new ``x0`` prediction at that sample, then
  2. predicts the next sample (UniP) from the last ``order`` ``x0`` predictions.
Both use B(h) = expm1(-h) ("bh2"). The order warms up from 1 and drops back to 1 for the last step ("lower order
final"), whose target sigma is 0, so the last step returns the final ``x0`` prediction.

This reproduces diffusers' ``UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
flow_shift=shift, solver_order=solver_order)`` with its other settings at their defaults, which is the scheduler config
of the released Wan2.1 diffusers checkpoints.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lightx2v.errors import UserError
from lightx2v.schedulers.euler import _next_step_index, check_num_steps, check_scheduler_args, shift_sigmas


def _lam(sigma: float) -> float:
    """log(alpha / sigma) of the flow path; +inf at sigma = 0 (clean data)."""
    return math.log(1.0 - sigma) - math.log(sigma) if sigma > 0 else math.inf


class FlowUniPCScheduler:
    """UniPC (bh2, predict-x0, corrector on) for flow-matching (velocity-predicting) models.

    Usage::

        sched = FlowUniPCScheduler(shift=5.0)
        sched.set_timesteps(50)
        for t in sched.timesteps:
            x = sched.step(model(x, t), x)

    ``timesteps`` hold whole numbers (``int(sigma * num_train_timesteps)``) as float32, as the model is trained on.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 5.0,
        solver_order: int = 2,
        use_corrector: bool = True,
    ):
        self.shift, self.num_train_timesteps = check_scheduler_args(shift, num_train_timesteps)
        if solver_order not in (1, 2, 3):
            raise UserError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")
        self.solver_order = solver_order
        self.use_corrector = bool(use_corrector)
        self.num_inference_steps = 0
        self.timesteps = torch.empty(0, dtype=torch.float32)
        self.sigmas = torch.empty(0, dtype=torch.float32)
        self._sig: list[float] = []
        self.reset()

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Build the schedule: ``timesteps`` (``num_inference_steps``) and ``sigmas`` (one more, ending at 0)."""
        n = check_num_steps(num_inference_steps)
        big_n = self.num_train_timesteps
        sigmas = shift_sigmas(np.linspace(1.0, 1.0 / big_n, n + 1)[:-1], self.shift)  # float64
        if abs(sigmas[0] - 1.0) < 1e-6:
            sigmas[0] -= 1e-6  # keeps log(alpha) finite at the first step
        # The model sees whole-number timesteps (truncated, as in diffusers and Wan), passed as float32.
        self.timesteps = torch.from_numpy((sigmas * big_n).astype(np.int64)).to(device=device, dtype=torch.float32)
        self.sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))  # stays on the CPU
        self._sig = self.sigmas.tolist()
        self.num_inference_steps = n
        self.reset()

    def reset(self) -> None:
        """Forget the solver history and start again from the first timestep (``set_timesteps`` calls this)."""
        self._step = 0
        self._history_start = 0  # step at which the solver history began (see restart_at)
        self._x0s: list[torch.Tensor] = []  # x0 predictions of the latest steps, oldest first
        self._last_sample: torch.Tensor | None = None  # sample the previous step started from
        self._last_order = 0

    @property
    def step_index(self) -> int:
        """Index of the next step to take."""
        return self._step

    def restart_at(self, step_index: int) -> None:
        """Forget the solver history and continue at ``step_index`` of the current schedule, as a fresh start
        (first order, no corrector on the first step). Used when the latents change resolution mid-run."""
        if not 0 <= step_index < self.num_inference_steps:
            raise RuntimeError(f"restart_at({step_index}) outside 0..{self.num_inference_steps - 1}")
        self.reset()
        self._step = self._history_start = step_index

    def step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Take one step from ``sample`` given the model's velocity prediction at it.

        Returns the next sample in ``sample``'s dtype; the solver state is kept in float32.
        """
        i = _next_step_index(self)
        x = sample.float()
        x0 = x - self._sig[i] * model_output.float()
        k = i - self._history_start  # steps of history available
        if self.use_corrector and k > 0:
            # UniC: redo the previous step from the sample it started at, now also knowing x0 at its end.
            x = self._update(self._last_sample, i - 1, self._last_order, x0_at_target=x0)
        self._x0s = (self._x0s + [x0])[-self.solver_order :]
        order = min(self.solver_order, k + 1, self.num_inference_steps - i)  # warm up; lower order final
        self._last_sample, self._last_order = x, order
        prev = self._update(x, i, order)  # UniP
        self._step += 1
        return prev.to(sample.dtype)

    def _update(self, x: torch.Tensor, s: int, order: int, x0_at_target: torch.Tensor | None = None) -> torch.Tensor:
        """One UniP (or, given ``x0_at_target``, UniC) B(h) update of ``x`` from ``sigmas[s]`` to ``sigmas[s + 1]``.

        ``self._x0s[-1 - k]`` must be the x0 prediction at ``sigmas[s - k]`` for k < order.
        """
        sigma_s, sigma_t = self._sig[s], self._sig[s + 1]
        alpha_t = 1.0 - sigma_t
        lam_s = _lam(sigma_s)
        h = _lam(sigma_t) - lam_s
        m0 = self._x0s[-1]

        # Ratios r_k of the older steps in lambda, and their scaled differences D_k = (x0_k - x0_0) / r_k.
        rks = [(_lam(self._sig[s - k]) - lam_s) / h for k in range(1, order)]
        diffs = [(self._x0s[-1 - k] - m0) / r for k, r in enumerate(rks, start=1)]

        # b_k = h*phi_{k+1}(h) * k! / B(h) with h*phi_1 = expm1(-h), h*phi_{k+1} = h*phi_k / (-h) - 1 / k!.
        hh = -h
        h_phi_1 = math.expm1(hh)
        b_h = h_phi_1  # bh2
        b, h_phi_k, fact = [], h_phi_1 / hh - 1.0, 1
        for k in range(1, order + 1):
            b.append(h_phi_k * fact / b_h)
            fact *= k + 1
            h_phi_k = h_phi_k / hh - 1.0 / fact
        vander = np.vander(np.array(rks + [1.0]), increasing=True).T  # row i holds r_k ** i

        if x0_at_target is None:  # predictor: order - 1 terms
            if order == 1:
                rhos = []
            elif order == 2:
                rhos = [0.5]
            else:
                rhos = np.linalg.solve(vander[:-1, :-1], b[:-1]).tolist()
        else:  # corrector: one more term, from x0 at the target
            diffs = diffs + [x0_at_target - m0]
            rhos = [0.5] if order == 1 else np.linalg.solve(vander, b).tolist()

        x_t = (sigma_t / sigma_s) * x - (alpha_t * h_phi_1) * m0
        for rho, d in zip(rhos, diffs):
            x_t = x_t - (alpha_t * b_h * rho) * d
        return x_t
