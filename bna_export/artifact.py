"""The ``.bna`` fit file: a JSON header and raw little-endian tensors, no pickle, no code.

Layout: 8-byte magic ``BNAFIT\\x00\\x01``, 8-byte little-endian header length, the UTF-8 JSON
header (keys sorted, padded with spaces to a multiple of 8), then the tensor bytes. The header's
``tensors`` maps each name to ``{"dtype", "shape", "offsets": [begin, end]}`` relative to the
start of the data; every entry is checked (dtype allowed, shape non-negative, byte count equal to
the shape's, ranges inside the file and not overlapping) before a byte of it is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BadInputError, FitFileError

MAGIC = b"BNAFIT\x00\x01"
FORMAT_VERSION = 1
MAX_HEADER = 64 << 20
_DTYPES = {"float32": np.float32, "int64": np.int64, "uint8": np.uint8, "bool": np.bool_}


@dataclass
class FitFile:
    """A header (JSON-able dict) and named tensors (numpy arrays)."""

    header: dict[str, Any]
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


def encode(fit: FitFile) -> bytes:
    """The exact bytes of a fit file (deterministic: sorted keys, sorted tensor names)."""
    entries, chunks, offset = {}, [], 0
    for name in sorted(fit.tensors):
        arr = np.ascontiguousarray(fit.tensors[name])
        dtype = arr.dtype.name
        if dtype not in _DTYPES:
            raise FitFileError(f"tensor {name!r} has unsupported dtype {dtype}")
        raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        entries[name] = {
            "dtype": dtype,
            "shape": list(arr.shape),
            "offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    header = dict(fit.header)
    header["format_version"] = FORMAT_VERSION
    header["tensors"] = entries
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False)
    blob = text.encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    return MAGIC + len(blob).to_bytes(8, "little") + blob + b"".join(chunks)


def _no_constant(name: str) -> None:
    """NaN and ±Infinity are not JSON, and :func:`encode` never writes them."""
    raise json.JSONDecodeError(f"{name} is not a JSON number", name, 0)


def decode(buf: bytes, source: str = "fit file") -> FitFile:
    """Parse and validate fit-file bytes; raises :class:`FitFileError` on anything malformed."""
    if len(buf) < 16 or buf[:8] != MAGIC:
        raise FitFileError(f"{source}: not a .bna fit file (bad magic)")
    n = int.from_bytes(buf[8:16], "little")
    if n > MAX_HEADER or 16 + n > len(buf):
        raise FitFileError(
            f"{source}: header length {n} does not fit the file "
            f"({len(buf)} bytes); the file is truncated or corrupt"
        )
    try:
        header = json.loads(buf[16 : 16 + n].decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # e.g. an integer of more than 4300 digits
        raise FitFileError(f"{source}: header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise FitFileError(f"{source}: header is not a JSON object")
    version = header.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise FitFileError(
            f"{source}: format version {version!r}; this tool reads {FORMAT_VERSION}"
        )
    entries = header.pop("tensors", None)
    if not isinstance(entries, dict):
        raise FitFileError(f"{source}: header has no tensor table")
    data = memoryview(buf)[16 + n :]
    spans, tensors = [], {}
    for name, e in entries.items():
        try:
            dtype = _DTYPES[e["dtype"]]
            shape = tuple(e["shape"])
            begin, end = e["offsets"]
            ok = (
                all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
                and isinstance(begin, int)
                and isinstance(end, int)
                and 0 <= begin <= end
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FitFileError(f"{source}: malformed entry for tensor {name!r}") from exc
        if not ok:
            raise FitFileError(f"{source}: malformed shape or offsets for tensor {name!r}")
        count = math.prod(shape)  # Python integers: a huge shape cannot wrap around
        if end > len(data) or end - begin != count * np.dtype(dtype).itemsize:
            raise FitFileError(
                f"{source}: tensor {name!r} does not fit its byte range; the "
                "file is truncated or corrupt"
            )
        spans.append((begin, end, name))
        arr = np.frombuffer(data[begin:end], dtype=np.dtype(dtype).newbyteorder("<"))
        tensors[name] = arr.reshape(shape).astype(dtype)
    spans.sort()
    for (_, e0, n0), (b1, _, n1) in itertools.pairwise(spans):
        if b1 < e0:
            raise FitFileError(f"{source}: tensors {n0!r} and {n1!r} overlap")
    return FitFile(header, tensors)


def check_folder(path: str | Path) -> None:
    """Fail with one line unless the folder that ``path`` is to be written into exists."""
    if not Path(path).resolve().parent.is_dir():
        raise BadInputError(f"{path}: the folder does not exist")


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write bytes to a temporary file beside ``path``, then rename: never a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save(path: str | Path, fit: FitFile) -> str:
    """Write a fit file atomically; returns its SHA-256."""
    data = encode(fit)
    write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def load(path: str | Path) -> FitFile:
    """Read and validate a fit file."""
    try:
        buf = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise FitFileError(f"{path}: no such file") from exc
    except OSError as exc:
        raise FitFileError(f"{path}: cannot read ({exc.strerror})") from exc
    return decode(buf, str(path))
