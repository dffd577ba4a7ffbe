"""Opening a ``.pt2`` (``torch.export``) archive from untrusted hands. The file is read once
into memory, and PyTorch reads only an archive built afresh from its checked parts: the
program (cleaned by :mod:`bna_export.pt2program`), the example inputs, the weights and
constants its configs name, and the version files. No process-wide state (environment,
logging) is changed; loads from several threads take turns inside PyTorch's deserializer,
which is not re-entrant.

``torch.export.load`` (torch 2.13) unpickles an archive's pickled weights and tensor constants
with ``weights_only=False``, its example inputs with a fall-back to ``weights_only=False``, and
its custom and opaque objects with plain ``pickle``: here those members must load with
``torch.load(weights_only=True)`` (the same bytes then load the same harmless way whatever
PyTorch asks for), and custom and opaque objects, AOTInductor packages, the legacy one-file
layouts and any member PyTorch's zip reader could see otherwise than Python's (repeated
names, names equal but for case, NUL or backslash in a name) are refused. A file that is no
such archive is refused before PyTorch's reader logs a traceback about it.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import torch

from .errors import ModelError
from .pt2program import AST_LOCK, clean_program

_MODELS = "models/"
_WEIGHTS = "data/weights/"
_CONSTANTS = "data/constants/"
_SAMPLES = "data/sample_inputs/"
_REFUSED_DIRS = ("data/aotinductor/",)
_NAME = re.compile(r"[A-Za-z0-9_]+\Z")  # a model's name
_PAYLOAD = re.compile(r"(weight|tensor)_[0-9]+\Z")  # a weight's or tensor constant's member
_FIXED = (
    "archive_format",
    "archive_version",
    "byteorder",
    ".data/version",
    ".data/serialization_id",
)


def _plain_pickle(data: bytes, what: str, spec: str) -> None:
    """Refuse ``data`` unless a weights-only unpickler accepts it."""
    try:
        torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:
        raise ModelError(
            f"{spec} holds pickled objects that are not plain tensors ({what}: "
            f"{type(exc).__name__})"
        ) from exc


def _members(archive: zipfile.ZipFile, spec: str) -> dict[str, zipfile.ZipInfo]:
    """Members by their name under the archive's one top folder (PyTorch's reader needs one);
    names PyTorch's reader could see otherwise than Python's are refused."""
    infos = archive.infolist()
    names = [info.filename for info in infos]
    if len({n.split("/", 1)[0] for n in names}) != 1 or any("/" not in n for n in names):
        raise ModelError(f"{spec} is not a torch.export archive (no single top folder)")
    if len({n.lower() for n in names}) != len(names):
        raise ModelError(f"{spec} is not a torch.export archive (a member name is repeated)")
    for n in names:
        parts = n.split("/")
        if any(c in n for c in "\\\0") or "" in parts[:-1] or ".." in parts or "." in parts:
            raise ModelError(f"{spec} is not a torch.export archive (member name {n[:60]!r})")
    return {n.split("/", 1)[1]: i for n, i in zip(names, infos, strict=True) if not n.endswith("/")}


def _config(archive: zipfile.ZipFile, info: zipfile.ZipInfo, spec: str) -> dict[str, dict]:
    try:
        entries = json.loads(archive.read(info))["config"]
        if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
            raise TypeError("config is not a mapping of entries")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ModelError(f"{spec}: malformed {info.filename} ({type(exc).__name__})") from exc
    return entries


def _open(data: bytes, spec: str) -> zipfile.ZipFile:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        bad = archive.testzip()  # reads every member: what follows reads them again safely
    except Exception as exc:  # BadZipFile, zlib.error, an encrypted or unknown-method member…
        raise ModelError(f"{spec} is not a torch.export archive ({type(exc).__name__})") from exc
    if bad is not None:
        raise ModelError(f"{spec} is corrupt (member {bad} fails its checksum)")
    return archive


def sanitised_archive(data: bytes, spec: str) -> bytes:
    """The archive PyTorch may read, built afresh from ``data``'s checked parts (see the
    module docstring). Raises :class:`ModelError` for anything else."""
    with _open(data, spec) as archive:
        members = _members(archive, spec)
        models = [n[len(_MODELS) :] for n in members if n.startswith(_MODELS)]
        if "archive_version" not in members or not models:
            raise ModelError(
                f"{spec} is not a torch.export archive of PyTorch 2.6 or later (no "
                "archive_version or models/): export it again with torch.export.save"
            )
        for name in members:
            if name.startswith(_REFUSED_DIRS):
                raise ModelError(
                    f"{spec} holds a compiled AOTInductor package ({name}): give the "
                    "torch.export program alone"
                )

        def member(name: str) -> bytes:
            if name not in members:
                raise ModelError(
                    f"{spec} is not a complete torch.export archive ({name} is missing)"
                )
            return archive.read(members[name])

        out = {n: member(n) for n in _FIXED if n in members}
        for file in models:
            model = file[:-5] if file.endswith(".json") else ""
            if not _NAME.match(model):
                raise ModelError(f"{spec}: unexpected member models/{file[:40]}")
            out[_MODELS + file] = clean_program(member(_MODELS + file), spec)
            samples = f"{_SAMPLES}{model}.pt"
            out[samples] = member(samples)
            _plain_pickle(out[samples], "sample inputs", spec)
            for folder, kind in ((_WEIGHTS, "weights"), (_CONSTANTS, "constants")):
                config = f"{folder}{model}_{kind}_config.json"
                out[config] = member(config)
                for key, entry in _config(archive, members[config], spec).items():
                    path = str(entry.get("path_name", ""))
                    if folder == _CONSTANTS and not path.startswith("tensor_"):
                        raise ModelError(
                            f"{spec} holds a pickled object constant {key!r} ({path[:40]}): "
                            "only tensors are accepted"
                        )
                    if not _PAYLOAD.match(path):
                        raise ModelError(f"{spec}: unexpected {kind} member {path[:40]!r}")
                    out[folder + path] = member(folder + path)
                    if entry.get("use_pickle"):
                        _plain_pickle(out[folder + path], folder + path, spec)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as fresh:
        for name, payload in out.items():
            fresh.writestr(zipfile.ZipInfo(f"archive/{name}", (1980, 1, 1, 0, 0, 0)), payload)
    return buffer.getvalue()


def check_archive(data: bytes, spec: str) -> None:
    """Raise :class:`ModelError` unless :func:`sanitised_archive` accepts ``data``."""
    sanitised_archive(data, spec)


_LOCK = AST_LOCK
"""torch.export's deserializer keeps the program being read in a global
(``_CURRENT_DESERIALIZER``, torch 2.13): two loads at once fail with an AssertionError, so
ours take turns; with the AST lock, since a load builds AST objects too."""


def load_module(path: Path, spec: str, device: torch.device) -> torch.fx.GraphModule:
    """The program in ``path`` as a module on ``device``: the file read once, the archive
    :func:`sanitised_archive` builds from it deserialised by PyTorch (one load at a time in
    this process). Raises :class:`ModelError` for anything else."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read {spec}: {exc.strerror or exc}") from exc
    clean = sanitised_archive(data, spec)
    try:
        with _LOCK:
            ep = torch.export.load(io.BytesIO(clean))
            if device.type != "cpu":  # device arguments recorded in the graph move too
                ep = torch.export.passes.move_to_device_pass(ep, device)
            return ep.module()
    except Exception as exc:
        raise ModelError(
            f"{spec} is not a readable torch.export archive ({type(exc).__name__})"
        ) from exc
