"""Samplers for flow-matching models: ``FlowUniPCScheduler`` (Wan's default) and ``FlowEulerScheduler``."""

from __future__ import annotations

from lightx2v.errors import UserError
from lightx2v.schedulers.euler import FlowEulerScheduler
from lightx2v.schedulers.unipc import FlowUniPCScheduler

SCHEDULERS = {"unipc": FlowUniPCScheduler, "euler": FlowEulerScheduler}

__all__ = ["SCHEDULERS", "FlowEulerScheduler", "FlowUniPCScheduler", "make_scheduler"]


def make_scheduler(name: str = "unipc", *, shift: float, num_train_timesteps: int = 1000):
    """Build the scheduler called ``name`` ("unipc" or "euler"); call ``set_timesteps`` on it before sampling."""
    if not isinstance(name, str) or name not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r}; allowed: {', '.join(repr(k) for k in SCHEDULERS)}")
    return SCHEDULERS[name](num_train_timesteps=num_train_timesteps, shift=shift)
