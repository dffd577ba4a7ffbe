"""Opening a ``.pt2`` (``torch.export``) archive from untrusted hands: the archive is read once
into memory and checked so that every pickle PyTorch would unpickle in it is one a weights-only
unpickler accepts, before PyTorch sees it. No process-wide state (environment, logging) is
changed, and loads may run from several threads (they take turns inside PyTorch's
deserializer, which is not re-entrant).

``torch.export.load`` (torch 2.13) unpickles an archive's pickled weights and tensor constants
with ``weights_only=False``, its example inputs with a fall-back to ``weights_only=False``, and
its custom and opaque objects with plain ``pickle``: a crafted archive would run code. Here
those members must load with ``torch.load(weights_only=True)`` (the same bytes then load the
same harmless way whatever PyTorch asks for), custom and opaque objects, AOTInductor packages
and the pre-2.6 layout are refused, and a file that is no such archive is refused before
PyTorch's reader logs a traceback about it.
"""

from __future__ import annotations

import io
import json
import threading
import zipfile
from pathlib import Path

import torch

from .errors import ModelError

_MODELS = "models/"
_WEIGHTS = "data/weights/"
_CONSTANTS = "data/constants/"
_SAMPLES = "data/sample_inputs/"
_REFUSED_DIRS = ("data/aotinductor/",)


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
    """Members by their name under the archive's one top folder (PyTorch's reader needs one)."""
    roots = {info.filename.split("/", 1)[0] for info in archive.infolist()}
    flat = [info.filename for info in archive.infolist() if "/" not in info.filename]
    if len(roots) != 1 or flat:
        raise ModelError(f"{spec} is not a torch.export archive (no single top folder)")
    return {
        info.filename.split("/", 1)[1]: info
        for info in archive.infolist()
        if not info.filename.endswith("/")
    }


def _config(archive: zipfile.ZipFile, info: zipfile.ZipInfo, spec: str) -> dict[str, dict]:
    try:
        entries = json.loads(archive.read(info))["config"]
        if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
            raise TypeError("config is not a mapping of entries")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ModelError(f"{spec}: malformed {info.filename} ({type(exc).__name__})") from exc
    return entries


def check_archive(data: bytes, spec: str) -> None:
    """Raise :class:`ModelError` unless ``data`` is a torch.export archive whose every pickle
    loads weights-only (see the module docstring)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        bad = archive.testzip()  # reads every member: what follows reads them again safely
    except Exception as exc:  # BadZipFile, zlib.error, an encrypted or unknown-method member…
        raise ModelError(f"{spec} is not a torch.export archive ({type(exc).__name__})") from exc
    if bad is not None:
        raise ModelError(f"{spec} is corrupt (member {bad} fails its checksum)")
    with archive:
        members = _members(archive, spec)
        models = [
            n[len(_MODELS) : -5] for n in members if n.startswith(_MODELS) and n.endswith(".json")
        ]
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

        def member(name: str) -> zipfile.ZipInfo:
            if name not in members:
                raise ModelError(
                    f"{spec} is not a complete torch.export archive ({name} is missing)"
                )
            return members[name]

        for model in models:
            _plain_pickle(archive.read(member(f"{_SAMPLES}{model}.pt")), "sample inputs", spec)
            for folder, kind in ((_WEIGHTS, "weights"), (_CONSTANTS, "constants")):
                config = f"{folder}{model}_{kind}_config.json"
                if config not in members:  # the legacy layout: one pickle of them all
                    _plain_pickle(archive.read(member(f"{folder}{model}.pt")), kind, spec)
                    continue
                for key, entry in _config(archive, members[config], spec).items():
                    path = str(entry.get("path_name", ""))
                    if folder == _CONSTANTS and not path.startswith("tensor_"):
                        raise ModelError(
                            f"{spec} holds a pickled object constant {key!r} ({path}): only "
                            "tensors are accepted"
                        )
                    info = member(folder + path)
                    if entry.get("use_pickle"):
                        _plain_pickle(archive.read(info), folder + path, spec)


_LOCK = threading.Lock()
"""torch.export's deserializer keeps the program being read in a global
(``_CURRENT_DESERIALIZER``, torch 2.13): two loads at once fail with an AssertionError, so
ours take turns."""


def load_module(path: Path, spec: str, device: torch.device) -> torch.fx.GraphModule:
    """The program in ``path`` as a module on ``device``: the file read once, checked by
    :func:`check_archive`, then deserialised by PyTorch (one load at a time in this process).
    Raises :class:`ModelError` for anything else."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read {spec}: {exc.strerror or exc}") from exc
    check_archive(data, spec)
    try:
        with _LOCK:
            ep = torch.export.load(io.BytesIO(data))
            if device.type != "cpu":  # device arguments recorded in the graph move too
                ep = torch.export.passes.move_to_device_pass(ep, device)
            return ep.module()
    except Exception as exc:
        raise ModelError(
            f"{spec} is not a readable torch.export archive ({type(exc).__name__})"
        ) from exc
