"""Z-Image's flow-matching Euler schedule.

The step is ``lightx2v.schedulers.euler``'s (``x + (sigma_next - sigma) * v``, float32); what differs is the
schedule. ``ZImagePipeline`` hands diffusers' ``FlowMatchEulerDiscreteScheduler`` the sigmas
``linspace(1, 1/n, n)`` (float32) and the scheduler shifts them, either with the fixed ``shift`` of its config
(Z-Image-Turbo: 3.0) or, with ``use_dynamic_shifting``, with ``mu`` interpolated from the number of image tokens
(the FLUX rule). A 0 is appended as the end point; timesteps are ``sigma * 1000``. The arithmetic below is the
reference's, operation by operation in float32, so the schedule is bit-identical.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lightx2v.errors import UserError
from lightx2v.models.z_image.arch import ZImageSchedulerConfig
from lightx2v.schedulers.euler import FlowEulerScheduler, check_num_steps, shift_sigmas


def image_seq_shift(image_seq_len: int, cfg: ZImageSchedulerConfig) -> float:
    """``mu`` of the dynamic shift: linear in the number of image tokens between (base_image_seq_len, base_shift) and
    (max_image_seq_len, max_shift)."""
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    b = cfg.base_shift - m * cfg.base_image_seq_len
    return image_seq_len * m + b


class ZImageScheduler(FlowEulerScheduler):
    """``set_timesteps(n, image_seq_len)`` builds Z-Image's schedule; ``step`` is the flow Euler step.

    ``shift`` (e.g. a request's ``sample_shift``) replaces the config's fixed shift and turns dynamic shifting off.
    """

    def __init__(self, cfg: ZImageSchedulerConfig, shift: float | None = None):
        super().__init__(num_train_timesteps=cfg.num_train_timesteps, shift=cfg.shift if shift is None else shift)
        self.cfg = cfg
        self.dynamic = cfg.use_dynamic_shifting and shift is None

    def set_timesteps(self, num_inference_steps: int, image_seq_len: int | None = None, device=None) -> None:
        """``image_seq_len``: (latent_h / 2) * (latent_w / 2), needed for dynamic shifting."""
        n = check_num_steps(num_inference_steps)
        base = torch.linspace(1.0, 1.0 / n, n).numpy()  # float32, the pipeline's default sigmas
        if self.dynamic:
            if image_seq_len is None:
                raise UserError("dynamic shifting needs the number of image tokens (image_seq_len)")
            mu = image_seq_shift(image_seq_len, self.cfg)
            if self.cfg.time_shift_type == "exponential":
                sig = math.exp(mu) / (math.exp(mu) + (1 / base - 1) ** 1.0)
            else:
                sig = mu / (mu + (1 / base - 1) ** 1.0)
        else:
            sig = shift_sigmas(base, self.shift)
        sigmas = torch.from_numpy(np.asarray(sig, dtype=np.float32)).to(torch.float32)
        self.timesteps = (sigmas * self.num_train_timesteps).to(device)
        self.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])  # stays on the CPU (step reads it as floats)
        self.num_inference_steps = n
        self.reset()
