"""Messages between the stages, and their byte format.

A message is a frozen dataclass registered with :func:`message` under a kind name. Its fields hold tensors, plain
JSON values (numbers, strings, lists, dicts, None), nested dataclasses and tuples/lists of these. The same objects
pass between stages in one process (no copy) or cross a process or machine boundary as bytes:

    frame = MAGIC (4 bytes "LX2M") | version (u16) | header length (u32) | header (UTF-8 JSON)
            | SHA-256 of header + payload (32 bytes) | payload

The header names the message kind, the request id, and every tensor (name, dtype, shape, offset, byte length)
and holds the plain values; the payload is the raw bytes of the tensors (contiguous, each at a 64-byte aligned
offset), so fp32/bf16/fp16 values come back bit for bit. Decoding from a writable buffer (a bytearray, shared
memory) makes tensors that are views of it: no copy. Truncated frames, a wrong checksum, an unknown version or
kind, or an inconsistent header raise :class:`MessageError` saying what is wrong.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from dataclasses import dataclass

import torch

from lightx2v.errors import UserError

MAGIC = b"LX2M"
VERSION = 1
_ALIGN = 64
_PREFIX = struct.Struct("<4sHI")  # magic, version, header length
_DIGEST = 32

_KINDS: dict[str, type] = {}
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16, torch.int32,
    torch.int64, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64)}


class MessageError(UserError):
    """A message's bytes cannot be decoded (truncated, corrupt, unknown version or kind)."""


def message(kind: str):
    """Class decorator: register a frozen dataclass as a message of ``kind`` (unique)."""

    def register(cls):
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass to be a message")
        if kind in _KINDS and _KINDS[kind] is not cls:
            raise ValueError(f"message kind {kind!r} is already registered by {_KINDS[kind].__name__}")
        _KINDS[kind] = cls
        cls.message_kind = kind
        return cls

    return register


def kinds() -> dict[str, type]:
    return dict(_KINDS)


# --- generic messages every family uses --------------------------------------------------------------------------

@message("frames")
@dataclass(frozen=True)
class Frames:
    """The decoder's output: frames [F, H, W, 3] float32 in [0, 1] on the CPU (an image: F = 1)."""

    frames: torch.Tensor
    fps: float  # frames per second (frame interpolation may give a non-integer rate)
    request: dict | None = None  # the request's plain values (GenerationRequest.to_wire())


# --- encoding ----------------------------------------------------------------------------------------------------

def _kind_of(obj) -> str:
    kind = getattr(type(obj), "message_kind", None)
    if kind is None or _KINDS.get(kind) is not type(obj):
        raise TypeError(f"{type(obj).__name__} is not a registered message (use @message)")
    return kind


def _encode_value(v, tensors: list[torch.Tensor]):
    if isinstance(v, torch.Tensor):
        tensors.append(v)
        return {"t": len(tensors) - 1}
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {"m": _kind_of(v), "f": {f.name: _encode_value(getattr(v, f.name), tensors)
                                       for f in dataclasses.fields(v)}}
    if isinstance(v, tuple):
        return {"tuple": [_encode_value(x, tensors) for x in v]}
    if isinstance(v, list):
        return {"list": [_encode_value(x, tensors) for x in v]}
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            raise TypeError("message dicts need string keys")
        return {"dict": {k: _encode_value(x, tensors) for k, x in v.items()}}
    if v is None or isinstance(v, (bool, int, float, str)):
        return {"v": v}
    raise TypeError(f"a message cannot carry a {type(v).__name__}")


def to_bytes(msg) -> bytes:
    """Serialize a registered message (tensors are copied to the CPU if needed)."""
    tensors: list[torch.Tensor] = []
    body = _encode_value(msg, tensors)
    specs, chunks, offset = [], [], 0
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        if str(t.dtype).removeprefix("torch.") not in _DTYPES:
            raise TypeError(f"a message cannot carry a tensor of dtype {t.dtype}")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        pad = -offset % _ALIGN
        chunks.append(b"\0" * pad)
        offset += pad
        specs.append({"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "offset": offset,
                      "nbytes": len(raw)})
        chunks.append(raw)
        offset += len(raw)
    request = getattr(msg, "request", None)
    header = json.dumps({"kind": _kind_of(msg), "request_id": (request or {}).get("request_id"),
                         "tensors": specs, "body": body, "payload_bytes": offset},
                        separators=(",", ":")).encode("utf-8")
    payload = b"".join(chunks)
    digest = hashlib.sha256(header)
    digest.update(payload)
    return b"".join([_PREFIX.pack(MAGIC, VERSION, len(header)), header, digest.digest(), payload])


def peek(data) -> dict:
    """The header of a frame (kind, request_id, tensors) without checking the payload."""
    header, _ = _split(memoryview(data), check=False)
    return header


def _split(buf: memoryview, check: bool) -> tuple[dict, memoryview]:
    if len(buf) < _PREFIX.size:
        raise MessageError(f"message truncated: {len(buf)} bytes, shorter than the {_PREFIX.size}-byte prefix")
    magic, version, hlen = _PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        raise MessageError(f"not a lightx2v message (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise MessageError(f"message format version {version} is not supported (this lightx2v reads version "
                           f"{VERSION})")
    start = _PREFIX.size
    if len(buf) < start + hlen + _DIGEST:
        raise MessageError(f"message truncated: {len(buf)} bytes, the header alone needs {start + hlen + _DIGEST}")
    header_bytes = buf[start:start + hlen]
    digest = bytes(buf[start + hlen:start + hlen + _DIGEST])
    payload = buf[start + hlen + _DIGEST:]
    try:
        header = json.loads(bytes(header_bytes).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise MessageError(f"message header is not valid JSON (corrupt message): {e}") from None
    if not isinstance(header, dict) or not {"kind", "tensors", "body", "payload_bytes"} <= header.keys():
        raise MessageError("message header lacks kind/tensors/body/payload_bytes (corrupt message)")
    if len(payload) != header["payload_bytes"]:
        raise MessageError(f"message truncated or padded: payload of {len(payload)} bytes, header says "
                           f"{header['payload_bytes']}")
    if check:
        h = hashlib.sha256(header_bytes)
        h.update(payload)
        if h.digest() != digest:
            raise MessageError(f"message checksum mismatch (kind {header.get('kind')!r}, request "
                               f"{header.get('request_id')!r}): the bytes were corrupted in transit")
    return header, payload


def from_bytes(data, *, verify: bool = True):
    """Decode a frame. ``data``: bytes, bytearray or memoryview; from a writable buffer the tensors are views of it
    (no copy), from read-only bytes they are copied once."""
    buf = memoryview(data)
    header, payload = _split(buf, check=verify)
    kind = header["kind"]
    if kind not in _KINDS:
        raise MessageError(f"unknown message kind {kind!r}; known: {', '.join(sorted(_KINDS))}")
    writable = not buf.readonly
    tensors = []
    for i, spec in enumerate(header["tensors"]):
        try:
            dtype = _DTYPES[spec["dtype"]]
            shape, off, n = tuple(spec["shape"]), spec["offset"], spec["nbytes"]
        except (KeyError, TypeError) as e:
            raise MessageError(f"tensor {i} of a {kind!r} message has a bad description: {e}") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        numel = 1
        for s in shape:
            numel *= s
        if n != numel * itemsize or off < 0 or off + n > len(payload):
            raise MessageError(f"tensor {i} of a {kind!r} message ({spec['dtype']} {list(shape)}) does not fit the "
                               f"payload (offset {off}, {n} bytes of {len(payload)})")
        if n == 0:
            tensors.append(torch.empty(shape, dtype=dtype))
            continue
        chunk = payload[off:off + n]
        if not writable:
            chunk = bytearray(chunk)
        tensors.append(torch.frombuffer(chunk, dtype=torch.uint8).view(dtype).reshape(shape))
    try:
        return _decode_value(header["body"], tensors)
    except (KeyError, TypeError, IndexError) as e:
        raise MessageError(f"the body of a {kind!r} message does not decode: {e!r}") from None


def _decode_value(node: dict, tensors: list[torch.Tensor]):
    if "t" in node:
        return tensors[node["t"]]
    if "m" in node:
        cls = _KINDS.get(node["m"])
        if cls is None:
            raise MessageError(f"unknown message kind {node['m']!r} inside a message")
        return cls(**{k: _decode_value(v, tensors) for k, v in node["f"].items()})
    if "tuple" in node:
        return tuple(_decode_value(x, tensors) for x in node["tuple"])
    if "list" in node:
        return [_decode_value(x, tensors) for x in node["list"]]
    if "dict" in node:
        return {k: _decode_value(x, tensors) for k, x in node["dict"].items()}
    return node["v"]


def equal(a, b) -> bool:
    """Structural equality with tensors compared bit for bit (dtype, shape and bytes)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(_raw(a), _raw(b)))
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and all(equal(getattr(a, f.name), getattr(b, f.name))
                                          for f in dataclasses.fields(a))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().reshape(-1).contiguous().view(torch.uint8)
