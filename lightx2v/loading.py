"""Strict, streamed checkpoint loading shared by every model family.

* files: ``safetensors_files`` (one file, an ``.index.json`` or numbered shards), ``read_json``,
  ``torch_load_state_dict`` (``.pth``, memory-mapped where possible), ``read_safetensors_dir``, ``require_file``,
  ``check_present``;
* streaming: ``iter_safetensors`` yields (key, tensor) one tensor at a time (safetensors memory-maps the files);
* strictness: ``assign_strict`` puts streamed tensors into a module built on the meta device and reports every
  missing / unexpected / mis-shaped key in one :class:`CheckpointError`; ``key_problems`` lists the same for a
  state dict without assigning;
* renames: ``rename_key`` (a declared regex table, first match wins) and ``rename_state_dict`` (every key must map,
  no two keys may land on one name).

Everything a family's loaders need lives here; a family's ``checkpoint.py`` holds only its layouts and key tables.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from lightx2v.errors import CheckpointError


def require_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise CheckpointError(f"missing {what}: {path}")
    return path


def safetensors_files(folder: Path, stem: str) -> list[Path]:
    """The shard files of ``stem`` in ``folder``: from ``stem.safetensors.index.json`` or the single file."""
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [require_file(folder / n, f"shard listed in {index.name}") for n in names]
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(folder.glob(f"{stem}-*-of-*.safetensors"))
    if shards:
        return shards
    raise CheckpointError(f"missing weights: no {stem}.safetensors (or its .index.json) in {folder}")


def unreadable_safetensors(path: Path, error: Exception) -> CheckpointError:
    """The error for a ``.safetensors`` file that safetensors cannot parse (a download cut short, a file of
    another format renamed, or garbage): names the file and says so, with safetensors' own reason."""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return CheckpointError(f"{path}: not a readable safetensors file, it is corrupt or incomplete ({reason}); "
                           "download or convert it again")


def open_safetensors(path: Path):
    """``safe_open(path)`` (memory-mapped, CPU) as a context manager; CheckpointError naming the file when it is
    missing, corrupt or incomplete (safetensors checks the header and that the data covers it at open)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing safetensors file: {path}")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise unreadable_safetensors(path, e) from None
    return handle


def safetensors_keys(path: Path) -> list[str]:
    """Tensor names stored in one safetensors file (header only); CheckpointError for a corrupt file."""
    with open_safetensors(path) as sf:
        return list(sf.keys())


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; CheckpointError naming the file when it is missing or not a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing {what}: {path}")
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return raw


def torch_load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A ``.pth`` state dict of tensors (memory-mapped where the file format allows), or CheckpointError."""
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read it as a torch state dict: {e}") from e
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read it as a torch state dict: {e}") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return dict(sd)


def check_present(items) -> None:
    """items: (path, what) pairs; one CheckpointError naming every absent one."""
    absent = [f"{what} {path}" for path, what in items if not Path(path).exists()]
    if absent:
        raise CheckpointError("missing files: " + "; ".join(absent))


def read_safetensors_dir(folder: Path, what: str, stem: str = "model") -> dict[str, torch.Tensor]:
    """All tensors of ``stem.safetensors`` in ``folder``, or of the shards its ``.index.json`` lists (transformers'
    layout), checking that every listed shard and key is there and that no key is stored twice."""
    from safetensors.torch import load_file

    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"

    def read(path: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise unreadable_safetensors(path, e) from None

    if single.is_file():
        return read(single)
    if not index.is_file():
        raise CheckpointError(f"missing {what} weights: neither {single} nor {index} exists")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map': {e}") from e
    absent = [str(folder / f) for f in files if not (folder / f).is_file()]
    if absent:
        raise CheckpointError(f"missing {what} shard files listed in {index}: {', '.join(absent)}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        part = read(folder / f)
        listed = [k for k, v in weight_map.items() if v == f and k not in part]
        if listed:
            raise CheckpointError(f"{folder / f}: keys listed in {index.name} are missing: {', '.join(listed)}")
        dup = sorted(set(part) & set(sd))
        if dup:
            raise CheckpointError(f"{folder / f}: keys also stored in another shard: {', '.join(dup)}")
        sd.update(part)
    return sd


def iter_safetensors(files: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor of the files, one at a time; CheckpointError naming a corrupt file."""
    for f in files:
        with open_safetensors(f) as sf:
            for key in sf.keys():
                try:
                    t = sf.get_tensor(key)
                except SafetensorError as e:
                    raise unreadable_safetensors(Path(f), e) from None
                yield key, t


# --- strict assignment into a meta-built module ---------------------------------------------------------------


def key_problems(expected: dict, sd, show_key=None,
                 mismatch: str = "{key} (checkpoint {got}, model {want})") -> list[str]:
    """What keeps ``sd`` from loading strictly into a module whose state dict has ``expected`` (name -> shape):
    missing, unexpected and mis-shaped keys, each as one line (empty when it fits). ``show_key`` renames keys for
    the message (e.g. to the checkpoint's own naming); ``mismatch`` formats one shape mismatch."""
    show = show_key or (lambda k: k)
    mismatched = []
    for k in sorted(expected.keys() & sd.keys()):
        v = sd[k]
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        if got != tuple(expected[k]):
            mismatched.append(mismatch.format(key=show(k), got=got, want=tuple(expected[k])))
    groups = (("missing keys", [show(k) for k in sorted(expected.keys() - sd.keys())]),
              ("unexpected keys", [show(k) for k in sorted(sd.keys() - expected.keys())]),
              ("shape mismatches", mismatched))
    return [f"{label}: {', '.join(dict.fromkeys(keys))}" for label, keys in groups if keys]



def assign_strict(module: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], *, what: str,
                  dtype_for=None, device="cpu") -> None:
    """Assign every tensor to the parameter/buffer of the same name; report all problems at once.

    ``dtype_for(name)`` gives the dtype each tensor is stored in (None: keep the checkpoint's).
    """
    expected = dict(module.state_dict(keep_vars=True))
    seen, unexpected, mismatched = set(), [], []
    for name, tensor in tensors:
        target = expected.get(name)
        if target is None:
            unexpected.append(name)
            continue
        if tuple(target.shape) != tuple(tensor.shape):
            mismatched.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(target.shape)}")
            continue
        dt = dtype_for(name) if dtype_for else None
        tensor = tensor.to(device=device, dtype=dt or tensor.dtype)
        _set_tensor(module, name, tensor)
        seen.add(name)
    missing = sorted(set(expected) - seen)
    problems = []
    if missing:
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(sorted(unexpected))}")
    if mismatched:
        problems.append(f"shape mismatches {_short(mismatched)}")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))


def _short(items: list[str], n: int = 20) -> str:
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + "]" + more


def _set_tensor(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor



def key_report(expected: Mapping[str, torch.Size | tuple], sd: Mapping[str, torch.Tensor], limit: int = 12
               ) -> list[str]:
    """Missing, unexpected and mis-shaped keys of ``sd`` against ``expected`` (name -> shape), one line per group
    with its count and at most ``limit`` entries (sorted), e.g. ``"missing keys (158): block0.conv0.0.0.bias, ...
    (146 more)"``; empty when ``sd`` fits exactly."""
    missing = sorted(expected.keys() - sd.keys())
    unexpected = sorted(sd.keys() - expected.keys())
    mismatched = []
    for k in sorted(expected.keys() & sd.keys()):
        got = tuple(sd[k].shape) if isinstance(sd[k], torch.Tensor) else type(sd[k]).__name__
        if got != tuple(expected[k]):
            mismatched.append(f"{k} (file {got}, model {tuple(expected[k])})")
    lines = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if keys:
            more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
            lines.append(f"{label} ({len(keys)}): {', '.join(keys[:limit])}{more}")
    return lines


# --- renames ----------------------------------------------------------------------------------------------------


def rename_key(key: str, table) -> str | None:
    """``table``: (compiled regex, replacement) pairs; the first pattern that matches at the start of ``key``
    rewrites it (None: no pattern matches)."""
    for pattern, repl in table:
        new, n = pattern.subn(repl, key, count=1)
        if n:
            return new
    return None


def rename_state_dict(sd: Mapping[str, torch.Tensor], mapping: Callable[[str], str | None], what: str
                      ) -> dict[str, torch.Tensor]:
    """Every key through ``mapping`` (None: no mapping); CheckpointError naming the unmapped keys, or two keys that
    land on the same name."""
    out: dict[str, torch.Tensor] = {}
    source_of: dict[str, str] = {}
    unmapped: list[str] = []
    for key, value in sd.items():
        new = mapping(key)
        if new is None:
            unmapped.append(key)
            continue
        if new in out:
            raise CheckpointError(f"{what}: keys {source_of[new]!r} and {key!r} both map to {new!r}")
        out[new] = value
        source_of[new] = key
    if unmapped:
        raise CheckpointError(f"{what}: {len(unmapped)} unexpected key(s) (no mapping): {', '.join(sorted(unmapped))}")
    return out


# --- lazy reading ---------------------------------------------------------------------------------------------


class LazyTensors:
    """The tensors of safetensors ``files`` by name, read one at a time when asked (the files are memory-mapped).

    ``rename(file_key) -> our key`` maps the names stored in the files onto the model's (None: keep them). Thread-safe
    (a loader thread and the main thread may both read). Used by ``lazy_load`` offloading and by loaders that need a
    subset of a checkpoint.
    """

    def __init__(self, files: Iterable[Path], rename: Callable[[str], str] | None = None, what: str = "checkpoint"):
        import threading

        self.files = [Path(f) for f in files]
        self.what = what
        self._index: dict[str, tuple[int, str]] = {}  # our key -> (file number, key in the file)
        for i, f in enumerate(self.files):
            for k in safetensors_keys(f):
                self._index[rename(k) if rename else k] = (i, k)
        self._handles: dict[int, object] = {}
        self._lock = threading.Lock()

    def _handle(self, i: int):
        if i not in self._handles:
            self._handles[i] = open_safetensors(self.files[i])
        return self._handles[i]

    def keys(self) -> Iterable[str]:
        return self._index.keys()

    def _lookup(self, key: str) -> tuple[int, str]:
        if key not in self._index:
            raise CheckpointError(f"{self.what} {self.files[0].parent}: missing key {key!r}")
        return self._index[key]

    def shape(self, key: str) -> tuple[int, ...]:
        i, k = self._lookup(key)
        with self._lock:
            return tuple(self._handle(i).get_slice(k).get_shape())

    def get(self, key: str) -> torch.Tensor:
        i, k = self._lookup(key)
        with self._lock:
            try:
                return self._handle(i).get_tensor(k)
            except SafetensorError as e:  # the file changed on disk after it was opened
                raise unreadable_safetensors(self.files[i], e) from None

    def close(self) -> None:
        with self._lock:
            self._handles.clear()


def cache_root() -> Path:
    """Where built-in tiny models are written on first use: ``$LIGHTX2V_CACHE_DIR`` or ``~/.cache/lightx2v``."""
    return Path(os.environ.get("LIGHTX2V_CACHE_DIR") or Path.home() / ".cache" / "lightx2v")


def ensure_model_folder(name: str, write: Callable[[Path], object], defaults: Mapping | None = None,
                        root: Path | None = None) -> Path:
    """The folder ``name`` under ``root`` (default :func:`cache_root`), written by ``write(folder)`` first if it is
    not complete yet: written aside and renamed, so that a half-written folder is never used (a copy another process
    wrote meanwhile is kept). ``defaults`` (config keys, e.g. a tiny model's sizes) go into its
    ``lightx2v_defaults.json``, which the pipeline reads as the folder's own defaults."""
    import shutil
    import tempfile

    folder = Path(root or cache_root()) / name
    if (folder / "COMPLETE").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        write(tmp)
        if defaults is not None:
            (tmp / "lightx2v_defaults.json").write_text(json.dumps(dict(defaults), indent=2) + "\n")
        (tmp / "COMPLETE").write_text("ok\n")
        try:
            tmp.rename(folder)
        except OSError:  # written meanwhile by another process
            if not (folder / "COMPLETE").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
