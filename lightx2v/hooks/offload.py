"""Weight offloading for a DiT (any model with a hook plan; Wan's is the example below): keep the transformer blocks in host memory (or on disk) and stream them to the
GPU just ahead of their use, overlapping every host->device copy with compute.

``apply_offload(model, OffloadConfig, device)`` attaches from outside (module forward pre-hooks); ``dit.py`` has no
offload code. Granularities (LightX2V's ``offload_granularity``):

- ``model``: every DiT weight lives in page-locked host memory; ``handle.onload()`` copies the whole model to the
  device for the denoising loop and ``handle.offload()`` drops the device copies again (the host copy is kept, so
  offloading copies nothing back). A forward while offloaded onloads first (and stays onloaded).
- ``block``: each block's tensors (parameters and buffers of any dtype: bf16, float32 islands, int8/fp8 weights with
  their ``weight_scale``) live in one flat page-locked host buffer per block. On the device there are
  ``num_prefetch + 1`` *slots*: flat byte buffers as large as the largest unit, allocated once and reused. The
  pre-hook of block i makes block i resident in a slot and points its parameters at views of the slot
  (``param.data = slot_view``; the host views are put back when the block is done), then starts the copies of blocks
  i+1 .. i+num_prefetch into the other slots. The order is cyclic: the hook of the last block prefetches the first
  unit of the next forward.
- The embeddings (the hook plan's ``embeddings``; Wan: ``patch_embedding, time_embedding, time_projection,
  text_embedding, img_emb``; used only before block 0) are streamed the same way (``offload_embeddings``, default true): packed into at most
  ``num_prefetch + 1`` units of at most a slot each, first in the cycle, all made resident by the model's forward
  pre-hook and released when the first block unit starts (or at the end of the forward, if every block is skipped).
  The last block's hook prefetches them, so they cost no device memory during the block loop and their copy
  overlaps the last block; the first block's copy then overlaps only the (short) embedding work. Wan2.1-I2V-14B:
  0.50 GiB, one unit with block slots, two with phase slots (the time projection alone fills a phase slot). A
  module larger than a slot grows the slots when that costs less than keeping it (Wan2.1-T2V-14B phases: the time
  projection is 11% larger than the FFN phase); what fits in no unit stays on the device. The ``head`` (used after
  the blocks) stays on the device.
- ``phase``: the same with a finer unit (the hook plan's ``phases``); a Wan block has three phases: (a) ``self_attn`` (q, k, v, o, norm_q, norm_k),
  (b) ``norm3`` + ``cross_attn``, (c) ``ffn``. The block's ``modulation`` ([1, 6, dim] float32, 120 KiB per block
  for the 14B model, ~5 MiB for all 40) is read in the block's forward *before* ``self_attn`` is called, so it stays
  resident on the device with the head; phase hooks sit on the phase modules themselves (phase (b) on both
  ``norm3`` and ``cross_attn``: whichever runs first brings it in).
- ``lazy_load`` (with block/phase): the block weights are not kept in host memory at all. A background thread
  reads each unit's tensors from the checkpoint (``safetensors.safe_open``: memory-mapped, one tensor at a time)
  into a small pool of reusable page-locked buffers (``num_prefetch + 1`` units), and launches the host->device copy
  into the slot. Host memory stays bounded by the pool (plus the OS page cache) and the embeddings' page-locked
  copy (0.5 GiB for 14B), which the main thread copies from (after any copy still queued for the same slot).

Synchronisation (CUDA). Per slot two events:

- ``ready``: recorded on the *copy stream* after the copy into the slot; the compute stream waits on it before the
  unit's kernels are queued (read-after-write).
- ``free``: recorded on the *compute stream* when the slot's unit is done (at the pre-hook of the next unit, or at
  the end of the model's forward); the copy stream waits on it before overwriting the slot (write-after-read).

All waits are stream-side (``Stream.wait_event``), so the Python thread never blocks on the GPU in the non-lazy
modes. Slot buffers are allocated on the compute stream and written on the copy stream, which is a hazard both
ways: at allocation the memory may just have been freed by tensors whose kernels are still queued on the compute
stream, so each slot starts with a ``free`` event recorded right after its allocation; and every copy calls
``slot.record_stream(copy_stream)`` so that the caching allocator cannot hand the memory out again (after
``offload()``/``remove()`` drop the slots) while a copy into it is still pending. Host buffers are owned by the
handle and only reused after the event of their last copy (lazy mode), so they need no ``record_stream``.

Host memory is page-locked with ``cudaHostRegister`` on a plain allocation of exactly the needed size: torch's
``pin_memory()`` rounds every allocation up to a power of two (a 0.8 GB Wan-14B block would take 1 GB).

Outputs are bit-identical to the plain model: the same kernels run on the same bytes in the same order (every
weight is contiguous and 256-byte aligned in its slot). Without CUDA (``device=cpu``) the same code runs with the
streams and events skipped and copies done synchronously, which is how the CPU tests exercise it.

Usage::

    handle = apply_offload(dit, OffloadConfig.from_lightx2v(config), torch.device("cuda"))
    with handle.resident():          # onload()/offload(): moves the model (model) or (de)allocates slots
        for t in timesteps:
            v = dit(x, t, ctx)
    handle.stats(); handle.remove()  # remove(): a plain model with every weight on the device, no hooks

Weights are treated as read-only while offloaded: merge LoRAs (or quantize) before ``apply_offload`` or after
``remove()``. Between forwards the streamed embeddings are host tensors: call the model, not its pieces
(``embed_time``, ``text_embedding``) on their own. Dynamic LoRA hooks and feature caching compose with it (they add
their own hooks on the modules or on the model's block stack; a skipped block is simply never made resident).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Union

import torch
import torch.nn as nn

from lightx2v.errors import CheckpointError, UserError
from lightx2v.models.plan import blocks_of, plan_of

GRANULARITIES = ("model", "block", "phase")
# Which modules are blocks, phases and embeddings comes from the model's hook plan (lightx2v.models.plan.HookPlan).
_ALIGN = 256  # byte alignment of every tensor inside a flat buffer (>= what any GEMM kernel asks for)


# --- config -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OffloadConfig:
    cpu_offload: bool = False
    offload_granularity: str = "block"  # "model" | "block" | "phase"
    lazy_load: bool = False  # block/phase: read the block weights from the checkpoint on disk as needed
    num_prefetch: int = 1  # units copied ahead of the running one; the device holds num_prefetch + 1 units
    # block/phase: stream the embeddings used only at the start of a forward (patch/text/time embeddings, the time
    # projection, the image projection) through the slots too, instead of keeping them on the device
    offload_embeddings: bool = True

    def __post_init__(self):
        for name in ("cpu_offload", "lazy_load", "offload_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name}={getattr(self, name)!r} must be true or false")
        if self.offload_granularity not in GRANULARITIES:
            raise UserError(f"offload_granularity={self.offload_granularity!r} is not supported; allowed: "
                            f"{', '.join(GRANULARITIES)}")
        if isinstance(self.num_prefetch, bool) or not isinstance(self.num_prefetch, int) or self.num_prefetch < 1:
            raise UserError(f"num_prefetch={self.num_prefetch!r} must be an integer >= 1")
        if self.lazy_load and not self.cpu_offload:
            raise UserError("lazy_load=true needs cpu_offload=true (with offload_granularity block or phase)")
        if self.lazy_load and self.offload_granularity == "model":
            raise UserError("lazy_load=true works with offload_granularity 'block' or 'phase', not 'model'")

    @classmethod
    def from_lightx2v(cls, d: Mapping) -> "OffloadConfig":
        """Read LightX2V's keys ``cpu_offload``, ``offload_granularity`` (null: "block"), ``lazy_load`` from a config
        dict; other keys belong to other concerns and are not looked at."""
        granularity = d.get("offload_granularity")
        return cls(cpu_offload=d.get("cpu_offload", False),
                   offload_granularity="block" if granularity is None else granularity,
                   lazy_load=d.get("lazy_load", False))


@dataclass(frozen=True)
class OffloadStats:
    bytes_h2d: int = 0  # bytes copied host -> device
    copies: int = 0  # host -> device copies: one per unit brought into a slot (model: one per tensor onloaded)
    bytes_read: int = 0  # lazy_load: bytes of weights read from the checkpoint
    peak_units_resident: int = 0  # most units (blocks / phases) in device slots at once, loading ones included
    peak_blocks_resident: int = 0  # most distinct blocks with weights in device slots at once
    slot_bytes: int = 0  # device bytes held by the slots (block / phase)
    resident_bytes: int = 0  # block / phase: device bytes of the weights that never leave it (head, rest)


# --- the tensors of a unit and their place in a flat buffer -----------------------------------------------------

class _Entry:
    """One parameter or buffer of a module: where it is, and how to point it at another tensor."""

    __slots__ = ("module", "leaf", "is_param", "name")

    def __init__(self, module: nn.Module, leaf: str, is_param: bool, name: str):
        self.module, self.leaf, self.is_param, self.name = module, leaf, is_param, name

    def get(self) -> torch.Tensor:
        return (self.module._parameters if self.is_param else self.module._buffers)[self.leaf]

    def set(self, t: torch.Tensor) -> None:
        if self.is_param:
            p = self.module._parameters[self.leaf]
            if p.device.type == "meta" or t.device.type == "meta":
                # set_data() cannot cross between meta and real tensors (lazy_load): a new Parameter object.
                self.module._parameters[self.leaf] = nn.Parameter(t, requires_grad=p.requires_grad)
            else:
                p.data = t  # the Parameter object stays the same
        else:
            self.module._buffers[self.leaf] = t


def _entries(module: nn.Module, prefix: str = "") -> list[_Entry]:
    out = []
    for mod_name, mod in module.named_modules(prefix=prefix):
        for leaf, p in mod._parameters.items():
            if p is not None:
                out.append(_Entry(mod, leaf, True, f"{mod_name}.{leaf}" if mod_name else leaf))
        for leaf, b in mod._buffers.items():
            if b is not None:
                out.append(_Entry(mod, leaf, False, f"{mod_name}.{leaf}" if mod_name else leaf))
    return out


@dataclass(frozen=True)
class _Spec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # bytes from the start of the flat buffer
    nbytes: int


def _layout(entries: list[_Entry]) -> tuple[tuple[_Spec, ...], int]:
    """Place the entries' tensors one after the other, each 256-byte aligned; returns (specs, total bytes)."""
    specs, off = [], 0
    for e in entries:
        t = e.get()
        nbytes = t.numel() * t.element_size()
        specs.append(_Spec(e.name, tuple(t.shape), t.dtype, off, nbytes))
        off += -(-nbytes // _ALIGN) * _ALIGN
    return tuple(specs), off


def _views(flat: torch.Tensor, layout: tuple[_Spec, ...]) -> list[torch.Tensor]:
    """Typed, shaped views of a flat uint8 buffer, one per spec."""
    with torch.inference_mode(False), torch.no_grad():
        return [flat[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape) for s in layout]


class _HostMemory:
    """A flat uint8 host buffer, page-locked when copies go to a CUDA device.

    Pinned with ``cudaHostRegister`` on an allocation of exactly ``nbytes`` (torch's ``pin_memory()`` would round it up
    to a power of two); falls back to ``pin_memory=True`` if registering fails. Unregistered by ``release()`` or when
    this object is collected (the storage may live on in views, merely no longer page-locked).
    """

    def __init__(self, nbytes: int, pin: bool):
        self.tensor = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        self._unregister = None
        if pin:
            cudart = torch.cuda.cudart()
            ptr = self.tensor.data_ptr()
            err = cudart.cudaHostRegister(ptr, self.tensor.numel(), 0)
            if int(getattr(err, "value", err)) == 0:
                self._unregister = weakref.finalize(self, cudart.cudaHostUnregister, ptr)
            else:
                self.tensor = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)

    def release(self) -> None:
        if self._unregister is not None:
            self._unregister()


# --- where lazy_load reads block weights from -------------------------------------------------------------------

class CheckpointBlocks:
    """Block tensors read one at a time from a checkpoint on disk (``source``: a
    :class:`lightx2v.loading.LazyTensors` in our names, e.g. from a family's loader). ``read(i, names)`` takes names
    relative to block i (``"self_attn.q.weight"``); ``prefix`` is the block stack's name in the model."""

    def __init__(self, source, prefix: str = "blocks"):
        self.source, self.prefix = source, prefix

    def shape(self, block: int, name: str) -> tuple[int, ...]:
        return self.source.shape(f"{self.prefix}.{block}.{name}")

    def read(self, block: int, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {n: self.source.get(f"{self.prefix}.{block}.{n}") for n in names}

    def close(self) -> None:
        self.source.close()


class _CallableBlocks:
    """A user callable ``fn(block) -> {name: tensor}`` (names relative to the block or with ``<prefix>.i.``)."""

    def __init__(self, fn: Callable[[int], Mapping[str, torch.Tensor]], prefix: str = "blocks"):
        self.fn, self.prefix = fn, prefix

    def read(self, block: int, names: Iterable[str]) -> dict[str, torch.Tensor]:
        prefix = f"{self.prefix}.{block}."
        got = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in self.fn(block).items()}
        names = list(names)
        missing = [n for n in names if n not in got]
        if missing:
            raise CheckpointError(f"weights_source gave block {block} without {missing}")
        return {n: got[n] for n in names}

    def close(self) -> None:
        pass


WeightsSource = Union[object, Callable[[int], Mapping[str, torch.Tensor]]]  # a LazyTensors, or a callable


def _as_source(ws: WeightsSource | None, prefix: str):
    if ws is None:
        raise UserError("lazy_load=true needs weights_source: the checkpoint's tensors (a lightx2v.loading.LazyTensors, "
                        "e.g. lightx2v.models.wan.checkpoint.dit_lazy_tensors(folder, layout)) or a callable giving "
                        "block i's tensors")
    if isinstance(ws, (CheckpointBlocks, _CallableBlocks)):
        return ws
    if hasattr(ws, "get") and hasattr(ws, "shape") and hasattr(ws, "close"):
        return CheckpointBlocks(ws, prefix)
    if callable(ws):
        return _CallableBlocks(ws, prefix)
    raise TypeError(f"weights_source must be a LazyTensors (or CheckpointBlocks) or a callable, got {ws!r}")


def _fill(flat: torch.Tensor, layout: tuple[_Spec, ...], tensors: Mapping[str, torch.Tensor], block: int) -> None:
    """Copy checkpoint tensors into the flat buffer (converting to the model's dtypes)."""
    for spec, view in zip(layout, _views(flat, layout)):
        t = tensors[spec.name]
        if tuple(t.shape) != spec.shape:
            raise CheckpointError(f"blocks.{block}.{spec.name}: checkpoint {tuple(t.shape)} vs model {spec.shape}")
        view.copy_(t)


# --- handles ------------------------------------------------------------------------------------------------------

class OffloadHandle:
    """What :func:`apply_offload` did to a model. ``onload() / offload() / resident()`` bracket the denoising loop,
    ``stats()`` reports the traffic, ``remove()`` gives the plain model back (every weight on the device, no hooks)."""

    granularity = "none"

    def __init__(self, model: nn.Module, config: OffloadConfig, device: torch.device):
        self.model, self.config, self.device = model, config, device
        self._hooks: list = []
        self._removed = False
        self._bytes_h2d = self._copies = self._bytes_read = 0
        self._peak_units = self._peak_blocks = 0

    def onload(self) -> None:
        """Get ready to run: model granularity moves every weight to the device; block/phase allocate the slots
        and start copying the first units."""

    def offload(self) -> None:
        """Give the device memory back: model granularity drops the device copies; block/phase free the slots."""

    @contextlib.contextmanager
    def resident(self) -> Iterator[None]:
        self.onload()
        try:
            yield
        finally:
            self.offload()

    def resident_blocks(self) -> list[int]:
        """Blocks with weights on the device now (in a slot, or being copied into one)."""
        return list(range(len(blocks_of(self.model))))

    def stats(self) -> OffloadStats:
        return OffloadStats(self._bytes_h2d, self._copies, self._bytes_read, self._peak_units, self._peak_blocks,
                            self._slot_bytes(), self._resident_bytes())

    def reset_stats(self) -> None:
        self._bytes_h2d = self._copies = self._bytes_read = 0
        self._peak_units = self._peak_blocks = 0

    def _slot_bytes(self) -> int:
        return 0

    def _resident_bytes(self) -> int:
        return 0

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._removed = True

    def _check_live(self) -> None:
        if self._removed:
            raise RuntimeError("this offload handle was removed")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(granularity={self.granularity!r}, device={self.device})"


class _NoOffload(OffloadHandle):
    """cpu_offload=false: the model is simply moved to the device."""

    def __init__(self, model, config, device):
        super().__init__(model, config, device)
        model.to(device)


class _ModelOffload(OffloadHandle):
    """offload_granularity="model": all weights in page-locked host memory between ``offload()`` and ``onload()``."""

    granularity = "model"

    def __init__(self, model, config, device):
        super().__init__(model, config, device)
        self._cuda = device.type == "cuda"
        # One host buffer per block and one for the rest, filled group by group: the model's own copies are
        # released as we go, so host memory peaks at about the model plus one block, not twice the model.
        blocks = blocks_of(model)
        groups = [_entries(b) for b in blocks]
        prefix = plan_of(model).blocks + "."
        groups.append([e for e in _entries(model) if not e.name.startswith(prefix)])
        self._entries: list[_Entry] = []
        self._host_views: list[torch.Tensor] = []
        self._hosts: list[_HostMemory] = []
        with torch.no_grad():
            for entries in groups:
                layout, nbytes = _layout(entries)
                host = _HostMemory(nbytes, pin=self._cuda)
                views = _views(host.tensor, layout)
                for e, v in zip(entries, views):
                    v.copy_(e.get())
                    e.set(v)
                self._hosts.append(host)
                self._entries += entries
                self._host_views += views
        self._resident = False
        # A forward while offloaded onloads first; the weights then stay on the device until offload().
        self._hooks.append(model.register_forward_pre_hook(lambda m, a: None if self._resident else self.onload()))

    def onload(self) -> None:
        self._check_live()
        if self._resident:
            return
        with torch.no_grad():
            for e, v in zip(self._entries, self._host_views):
                # Queued on the current stream, so the compute that follows on it is ordered after the copy.
                e.set(torch.empty_like(v, device=self.device).copy_(v, non_blocking=self._cuda))
                self._bytes_h2d += v.numel() * v.element_size()
                self._copies += 1
        self._resident = True
        n = len(blocks_of(self.model))
        self._peak_units = self._peak_blocks = max(self._peak_blocks, n)

    def offload(self) -> None:
        self._check_live()
        if not self._resident:
            return
        # The host copy is unchanged (weights are read-only here): point back at it; the device tensors are freed
        # by the caching allocator in stream order, after the kernels queued on them.
        for e, v in zip(self._entries, self._host_views):
            e.set(v)
        self._resident = False

    def resident_blocks(self) -> list[int]:
        return list(range(len(blocks_of(self.model)))) if self._resident else []

    def remove(self) -> None:
        if self._removed:
            return
        self.onload()  # device copies of every weight (clones on the CPU): nothing points at the host buffers now
        super().remove()
        if self._cuda:
            torch.cuda.current_stream(self.device).synchronize()  # the copies out of the host buffers are done
        self._host_views = []
        for host in self._hosts:
            host.release()
        self._hosts = []


class _Unit:
    """A block (or one phase of a block), or a group of embeddings (``block`` None, kind ``"embeddings"``): its
    tensors, their layout in a flat buffer and where they are now."""

    def __init__(self, index: int, block: int | None, kind: str, entries: list[_Entry]):
        self.index, self.block, self.kind, self.entries = index, block, kind, entries
        self.layout, self.nbytes = _layout(entries)
        self.layout_id = 0  # equal for units of the same structure: they share their views of a slot
        self.host: _HostMemory | None = None  # non-lazy: the unit's page-locked copy
        self.host_views: list[torch.Tensor] = []  # what the entries point at while not in a slot
        self.slot: _Slot | None = None

    def __repr__(self) -> str:
        return f"_Unit(block={self.block}, kind={self.kind})"


class _Copy:
    """One host->device copy into a slot: ``done`` once it is queued (at once, unless a loader thread reads the
    weights first), ``ready`` the CUDA event recorded after it on the copy stream (None without CUDA)."""

    def __init__(self):
        self.done = threading.Event()
        self.ready: torch.cuda.Event | None = None
        self.error: BaseException | None = None

    def wait(self) -> torch.cuda.Event | None:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.ready


class _Slot:
    """A reusable device buffer holding one unit's tensors."""

    def __init__(self, nbytes: int, device: torch.device):
        self.buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.unit: _Unit | None = None
        self.copy: _Copy | None = None
        self.free: torch.cuda.Event | None = None  # recorded on the compute stream after the last use of the slot
        self._views: dict[int, list[torch.Tensor]] = {}

    def views(self, unit: _Unit) -> list[torch.Tensor]:
        if unit.layout_id not in self._views:
            self._views[unit.layout_id] = _views(self.buf, unit.layout)
        return self._views[unit.layout_id]


class _DiskLoader:
    """Background thread: reads a unit's tensors from the checkpoint into a reusable host buffer, then queues the
    host->device copy into the unit's slot on the copy stream (jobs run in submission order)."""

    def __init__(self, source, device: torch.device, copy_stream, num_buffers: int, nbytes: int, pin: bool):
        self.source, self.device, self.copy_stream = source, device, copy_stream
        self._cuda = device.type == "cuda"
        # Host buffers with the event of their last copy: a buffer is refilled only after that copy has finished.
        self._buffers: list[tuple[_HostMemory, torch.cuda.Event | None]] = [
            (_HostMemory(nbytes, pin), None) for _ in range(num_buffers)]
        self._next = 0
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="lightx2v-offload-loader", daemon=True)
        self._thread.start()

    def submit(self, unit: _Unit, slot: _Slot) -> _Copy:
        job = _Copy()
        self._jobs.put((unit, slot.buf, slot.free, job))
        return job

    def _run(self) -> None:
        if self._cuda:
            torch.cuda.set_device(self.device)
        while True:
            item = self._jobs.get()
            if item is None:
                return
            unit, dst, free, job = item
            try:
                job.ready = self._load(unit, dst, free)
            except BaseException as exc:  # handed to the main thread by job.wait()
                job.error = exc
            finally:
                job.done.set()

    def _load(self, unit: _Unit, dst: torch.Tensor, free):
        host, last = self._buffers[self._next]
        if last is not None:
            last.synchronize()  # the previous copy out of this host buffer has finished
        with torch.no_grad():
            _fill(host.tensor, unit.layout, self.source.read(unit.block, [s.name for s in unit.layout]), unit.block)
            n = unit.nbytes
            if not self._cuda:
                dst[:n].copy_(host.tensor[:n])
                return None
            with torch.cuda.stream(self.copy_stream):
                if free is not None:
                    self.copy_stream.wait_event(free)  # the slot's previous unit is done on the compute stream
                dst[:n].copy_(host.tensor[:n], non_blocking=True)
                dst.record_stream(self.copy_stream)
                ready = torch.cuda.Event()
                ready.record(self.copy_stream)
        self._buffers[self._next] = (host, ready)
        self._next = (self._next + 1) % len(self._buffers)
        return ready

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()
        for host, ev in self._buffers:
            if ev is not None:
                ev.synchronize()
            host.release()
        self._buffers = []


class _SlotOffload(OffloadHandle):
    """offload_granularity="block" / "phase": units streamed through ``num_prefetch + 1`` device slots."""

    def __init__(self, model, config, device, weights_source=None):
        super().__init__(model, config, device)
        self.granularity = config.offload_granularity
        self._cuda = device.type == "cuda"
        self._lazy = config.lazy_load
        plan = plan_of(model)
        self._phases = dict(plan.phases)
        if self.granularity == "phase" and not self._phases:
            raise UserError(f"offload_granularity 'phase' is not available for {type(model).__name__} (its hook plan "
                            "declares no phases); use 'block'")
        blocks = blocks_of(model)
        block_prefix = plan.blocks + "."
        self._source = _as_source(weights_source, plan.blocks) if self._lazy else None
        units, resident = self._make_units(blocks)
        if not units:
            raise UserError("offloading needs a model with at least one block")
        self._slot_nbytes = max(u.nbytes for u in units)
        embed: list[_Unit] = []
        if config.offload_embeddings:
            embed, self._slot_nbytes = self._embedding_units(model, plan.embeddings, self._slot_nbytes,
                                                             config.num_prefetch + 1)
        # The cycle of units: the embeddings (all resident together, from the start of the model's forward until the
        # first block unit starts), then the block units; the last one prefetches the first ones.
        self._units = embed + units
        self._embed = tuple(embed)
        ids: dict[tuple[_Spec, ...], int] = {}
        for i, u in enumerate(self._units):
            u.index = i
            u.layout_id = ids.setdefault(u.layout, len(ids))
        self._active: tuple[_Unit, ...] = ()
        self._slots: list[_Slot] | None = None
        self._num_slots = min(config.num_prefetch + 1, len(self._units))
        # Streams: copies go on their own stream; compute runs on whatever stream is current at the hooks.
        self._copy_stream = torch.cuda.Stream(device=device) if self._cuda else None
        pin = self._cuda

        with torch.no_grad():
            # The other non-block weights (and, for phases, what no phase holds: the block modulation) live on the
            # device.
            streamed = {e.name for u in embed for e in u.entries}
            self._resident_nbytes = 0
            for e in _entries(model):
                if not e.name.startswith(block_prefix) and e.name not in streamed:
                    e.set(e.get().to(device))
                    self._resident_nbytes += e.get().numel() * e.get().element_size()
            for b, entries in resident.items():
                tensors = self._source.read(b, [e.name for e in entries]) if self._lazy else {}
                for e in entries:
                    t = tensors.get(e.name, e.get())
                    if self._lazy and tuple(t.shape) != tuple(e.get().shape):
                        raise CheckpointError(f"{block_prefix}{b}.{e.name}: checkpoint {tuple(t.shape)} vs model "
                                              f"{tuple(e.get().shape)}")
                    e.set(t.to(device=device, dtype=e.get().dtype))
                    self._resident_nbytes += t.numel() * e.get().element_size()
            for u in self._units:
                if self._from_disk(u):
                    if isinstance(self._source, CheckpointBlocks):  # strict: every key and shape, before running
                        for s in u.layout:
                            shape = self._source.shape(u.block, s.name)
                            if shape != s.shape:
                                raise CheckpointError(f"{block_prefix}{u.block}.{s.name}: checkpoint {shape} vs "
                                                      f"model {s.shape}")
                    # No host copy at all: while not in a slot the tensors are shapes on the meta device.
                    u.host_views = [torch.empty(s.shape, dtype=s.dtype, device="meta") for s in u.layout]
                else:
                    u.host = _HostMemory(u.nbytes, pin)
                    u.host_views = _views(u.host.tensor, u.layout)
                    for e, v in zip(u.entries, u.host_views):
                        v.copy_(e.get())
                for e, v in zip(u.entries, u.host_views):
                    e.set(v)
        self._loader = (_DiskLoader(self._source, device, self._copy_stream, self._num_slots, self._slot_nbytes, pin)
                        if self._lazy else None)

        for u in units:
            for m in self._triggers(blocks[u.block], u.kind):
                self._hooks.append(m.register_forward_pre_hook(lambda mod, args, u=u: self._activate((u,))))
        if self._embed:
            self._hooks.append(model.register_forward_pre_hook(lambda mod, args: self._activate(self._embed)))
        self._hooks.append(model.register_forward_hook(lambda mod, args, out: self._release_active()))

    # -- structure ------------------------------------------------------------------------------------------------

    def _make_units(self, blocks: nn.ModuleList) -> tuple[list[_Unit], dict[int, list[_Entry]]]:
        units: list[_Unit] = []
        resident: dict[int, list[_Entry]] = {}
        for b, block in enumerate(blocks):
            if self.granularity == "block":
                units.append(_Unit(len(units), b, "block", _entries(block)))
                continue
            covered = set()
            for kind, names in self._phases.items():
                entries = [e for n in names for e in _entries(block.get_submodule(n), prefix=n)]
                covered.update(e.name for e in entries)
                units.append(_Unit(len(units), b, kind, entries))
            resident[b] = [e for e in _entries(block) if e.name not in covered]
        return units, resident

    @staticmethod
    def _embedding_units(model: nn.Module, names: tuple[str, ...], slot_nbytes: int, num_slots: int
                         ) -> tuple[list[_Unit], int]:
        """Pack the embedding modules into at most ``num_slots`` units of at most a slot each (first fit, largest
        first); returns the units and the slot size. A module larger than a slot grows the slots if that costs less
        device memory than keeping it resident (Wan2.1-T2V-14B phases: the time projection is 11% larger than the
        largest phase); the modules that fit nowhere stay on the device."""
        sized = []
        for name in names:
            module = getattr(model, name, None)
            if isinstance(module, nn.Module):
                entries = _entries(module, prefix=name)
                if entries:
                    sized.append((_layout(entries)[1], name, entries))
        if not sized:
            return [], slot_nbytes
        sized.sort(key=lambda t: -t[0])
        largest = sized[0][0]
        if largest > slot_nbytes and (largest - slot_nbytes) * num_slots < largest:
            slot_nbytes = largest
        bins: list[tuple[int, list[_Entry]]] = []
        for nbytes, _, entries in sized:
            for i, (used, group) in enumerate(bins):
                if used + nbytes <= slot_nbytes:
                    bins[i] = (used + nbytes, group + entries)
                    break
            else:
                if nbytes <= slot_nbytes and len(bins) < num_slots:
                    bins.append((nbytes, list(entries)))
        return [_Unit(0, None, "embeddings", group) for _, group in bins], slot_nbytes

    def _triggers(self, block: nn.Module, kind: str) -> list[nn.Module]:
        if kind == "block":
            return [block]
        return [block.get_submodule(n) for n in self._phases[kind]]

    def _from_disk(self, unit: _Unit) -> bool:
        """lazy_load reads the block units from the checkpoint; the embeddings always have a host copy."""
        return self._lazy and unit.block is not None

    # -- the hooks ------------------------------------------------------------------------------------------------

    def _activate(self, units: tuple[_Unit, ...]) -> None:
        """Forward pre-hook: make ``units`` (a block or phase unit, or all the embedding units, consecutive in the
        cycle) resident in slots, point their tensors there, prefetch the units after them."""
        if self._active == units:
            return
        self._release_active()
        self._ensure_slots()
        window = self._window(units[0])  # the units themselves first (if not prefetched), then the ones after
        for u in window:
            if u.slot is None:
                self._load(u, keep=window)
        self._note_residency()
        for unit in units:
            slot = unit.slot
            ready = slot.copy.wait()  # lazy: blocks until the loader thread has read the weights and queued the copy
            if ready is not None:
                torch.cuda.current_stream(self.device).wait_event(ready)  # compute waits for the copy (stream-side)
            for e, v in zip(unit.entries, slot.views(unit)):
                e.set(v)
        self._active = units

    def _release_active(self) -> None:
        """The active units' kernels are all queued: point their tensors back at the host and mark their slots free
        after them. Called by the next unit's pre-hook, and by the model's forward hook (the last unit; the first
        units of the next forward were already prefetched by it)."""
        if not self._active:
            return
        if self._cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
        for unit in self._active:
            for e, v in zip(unit.entries, unit.host_views):
                e.set(v)
            if self._cuda:
                unit.slot.free = ev
        self._active = ()

    def _window(self, unit: _Unit) -> list[_Unit]:
        """The unit and the num_prefetch units after it, cyclically (the last block's successor is the first unit:
        the embeddings, or block 0)."""
        n = len(self._units)
        out: list[_Unit] = []
        for j in range(self._num_slots):
            u = self._units[(unit.index + j) % n]
            if u not in out:
                out.append(u)
        return out

    def _ensure_slots(self) -> None:
        if self._slots is None:
            with torch.inference_mode(False):
                self._slots = [_Slot(self._slot_nbytes, self.device) for _ in range(self._num_slots)]
            if self._cuda:
                # The allocator may carve the slots out of memory that tensors freed on the compute stream still
                # use in queued kernels (stream-ordered reuse is safe only on that stream): the first copy into a
                # slot on the copy stream must wait for them too.
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(self.device))
                for s in self._slots:
                    s.free = ev

    def _load(self, unit: _Unit, keep: list[_Unit]) -> None:
        """Bring ``unit`` into a slot whose unit is not in ``keep`` (there is one: len(keep) <= number of slots)."""
        slot = next((s for s in self._slots if s.unit is None), None)
        if slot is None:
            slot = next(s for s in self._slots if s.unit not in keep and s.unit not in self._active)
            slot.unit.slot = None
            if not self._from_disk(unit) and slot.copy is not None:
                # lazy_load: the slot's unit may never have run (skipped blocks) and its copy may still wait in the
                # loader's queue; ours must come after it on the copy stream (the loader's jobs keep their order).
                slot.copy.done.wait()
        slot.unit, unit.slot = unit, slot
        n = unit.nbytes
        if self._from_disk(unit):
            slot.copy = self._loader.submit(unit, slot)
            self._bytes_read += n
        else:
            copy = _Copy()
            if self._cuda:
                with torch.cuda.stream(self._copy_stream):
                    if slot.free is not None:
                        self._copy_stream.wait_event(slot.free)  # the slot's previous unit is done computing
                    slot.buf[:n].copy_(unit.host.tensor[:n], non_blocking=True)  # page-locked -> truly async
                    slot.buf.record_stream(self._copy_stream)
                    copy.ready = torch.cuda.Event()
                    copy.ready.record(self._copy_stream)
            else:
                slot.buf[:n].copy_(unit.host.tensor[:n])
            copy.done.set()
            slot.copy = copy
        self._bytes_h2d += n
        self._copies += 1

    def _note_residency(self) -> None:
        units = [s.unit for s in self._slots if s.unit is not None]
        self._peak_units = max(self._peak_units, len(units))
        self._peak_blocks = max(self._peak_blocks, len({u.block for u in units if u.block is not None}))

    # -- public -------------------------------------------------------------------------------------------------

    def resident_blocks(self) -> list[int]:
        if self._slots is None:
            return []
        return sorted({s.unit.block for s in self._slots if s.unit is not None and s.unit.block is not None})

    def _slot_bytes(self) -> int:
        return 0 if self._slots is None else self._slot_nbytes * len(self._slots)

    def _resident_bytes(self) -> int:
        return self._resident_nbytes

    def onload(self) -> None:
        self._check_live()
        self._ensure_slots()
        window = self._window(self._units[0])
        for u in window:
            if u.slot is None:
                self._load(u, keep=window)
        self._note_residency()

    def offload(self) -> None:
        self._check_live()
        self._release_active()
        self._drop_slots()

    def _drop_slots(self) -> None:
        if self._slots is None:
            return
        if self._loader is not None:
            for s in self._slots:  # the loader thread still holds queued copies into these slots
                if s.copy is not None:
                    s.copy.done.wait()
        # Pending copies were recorded on the slot buffers (record_stream): the allocator reuses them only after.
        for s in self._slots:
            if s.unit is not None:
                s.unit.slot = None
        self._slots = None

    def remove(self) -> None:
        if self._removed:
            return
        self._release_active()
        super().remove()
        self._drop_slots()
        if self._loader is not None:
            self._loader.close()
            self._loader = None
        if self._cuda:
            self._copy_stream.synchronize()  # prefetches may still read the host buffers released below
        with torch.no_grad():
            for u in self._units:
                if self._from_disk(u):
                    tensors = self._source.read(u.block, [s.name for s in u.layout])
                    values = [tensors[s.name] for s in u.layout]
                else:
                    values = u.host_views
                for e, s, v in zip(u.entries, u.layout, values):
                    e.set(torch.empty(s.shape, dtype=s.dtype, device=self.device).copy_(v))
                u.host_views = []
                if u.host is not None:
                    u.host.release()  # the copies above were synchronous (pageable destination or same device)
                    u.host = None
        if self._source is not None:
            self._source.close()
        self._units = []


def apply_offload(model: nn.Module, cfg: OffloadConfig, device: torch.device | str, *,
                  weights_source: WeightsSource | None = None) -> OffloadHandle:
    """Offload the weights of a DiT as ``cfg`` says. Which modules are its blocks, their phases and its embeddings
    comes from the model's hook plan (``model.hook_plan``, :class:`lightx2v.models.plan.HookPlan`).

    ``device``: where the model computes. ``weights_source`` (``lazy_load`` only; ignored otherwise): the checkpoint's
    tensors in our names (a :class:`lightx2v.loading.LazyTensors`, e.g. from
    ``lightx2v.models.wan.checkpoint.dit_lazy_tensors``), or a callable giving ``{name: tensor}`` for block i. With
    ``lazy_load`` the model's block tensors may be on the meta device (see
    ``lightx2v.models.wan.checkpoint.load_dit_without_blocks``): only their shapes and dtypes are used.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if not cfg.cpu_offload:
        return _NoOffload(model, cfg, device)
    if cfg.offload_granularity == "model":
        return _ModelOffload(model, cfg, device)
    return _SlotOffload(model, cfg, device, weights_source)


__all__ = ["OffloadConfig", "OffloadStats", "OffloadHandle", "CheckpointBlocks", "apply_offload", "GRANULARITIES"]
