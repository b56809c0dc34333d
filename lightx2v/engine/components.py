"""Where a stage's component (text encoder, image encoder, VAE half) lives between requests."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from lightx2v.engine.runner import empty_device_cache


class ComponentSlot:
    """``resident``: loaded once on the device. ``cpu``: loaded once on the CPU and moved to the device only while
    it is used (LightX2V's ``t5_cpu_offload`` / ``clip_cpu_offload`` / ``vae_cpu_offload``). ``unload``: loaded from
    disk when used and freed right after (``unload_modules``), for the smallest footprint. ``load(device)`` builds
    the component on a device."""

    def __init__(self, load: Callable[[torch.device], Any], device: torch.device, policy: str = "resident"):
        self.load, self.device, self.policy = load, device, policy
        self.obj = None if policy == "unload" else load(device if policy == "resident" else torch.device("cpu"))

    @contextlib.contextmanager
    def use(self):
        if self.policy == "resident":
            yield self.obj
        elif self.policy == "cpu":
            self.obj.to(self.device)
            try:
                yield self.obj
            finally:
                self.obj.to(torch.device("cpu"))
                empty_device_cache(self.device)
        else:
            obj = self.load(self.device)
            try:
                yield obj
            finally:
                del obj
                empty_device_cache(self.device)

    def modules(self) -> list[torch.nn.Module]:
        """The nn.Modules the slot holds now (for checks of what a stage holds)."""
        obj = self.obj
        if obj is None:
            return []
        if isinstance(obj, torch.nn.Module):
            return [obj]
        return [v for v in vars(obj).values() if isinstance(v, torch.nn.Module)]


def slot_policy(offload: bool, unload: bool) -> str:
    return "unload" if unload else ("cpu" if offload else "resident")
