"""Hostile ``.pt2`` archives: every one refused with one line and nothing from PyTorch on
stderr, no pickle payload ever run (it would create a marker file), and loads from several
threads at once that never touch the process environment."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from bna_export.errors import ModelError
from bna_export.model import load_model


class Payload:
    """Unpickling this creates the marker file: proof that code from the input ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _rewrite(
    src: Path,
    dst: Path,
    change: Callable[[str, bytes], bytes | None] = lambda n, b: b,
    extra: dict[str, bytes] | None = None,
) -> Path:
    """A copy of the archive ``src`` with each member through ``change`` (None drops it)."""
    with zipfile.ZipFile(src) as s, zipfile.ZipFile(dst, "w") as d:
        for item in s.infolist():
            data = change(item.filename, s.read(item.filename))
            if data is not None:
                d.writestr(item, data)
        root = s.infolist()[0].filename.split("/")[0]
        for name, data in (extra or {}).items():
            d.writestr(f"{root}/{name}", data)
    return dst


def _config(entries: dict) -> bytes:
    return json.dumps({"config": entries}).encode()


def hostile_archives(model: Path, folder: Path, marker: Path) -> dict[str, tuple[Path, str]]:
    """name: (archive, what its refusal says), every one built from the good ``model``."""
    buf = io.BytesIO()
    torch.save((Payload(marker),), buf)
    evil_torch, evil_pickle = buf.getvalue(), pickle.dumps(Payload(marker))
    with zipfile.ZipFile(model) as z:
        weights = json.loads(z.read(next(n for n in z.namelist() if "weights_config" in n)))
    first = next(iter(weights["config"]))
    pickled = dict(weights["config"])
    pickled[first] = {**pickled[first], "use_pickle": True}
    first_file = "data/weights/" + pickled[first]["path_name"]
    const = {"is_param": False, "use_pickle": True, "tensor_meta": None}

    def opaque(n: str, b: bytes) -> bytes:
        if n.endswith("constants_config.json"):
            return _config({"c": {**const, "path_name": "opaque_obj_0"}})
        return b

    def tensor(n: str, b: bytes) -> bytes:
        if n.endswith("constants_config.json"):
            return _config({"c": {**const, "path_name": "tensor_0"}})
        return b

    def weight(n: str, b: bytes) -> bytes:
        if n.endswith("weights_config.json"):
            return _config(pickled)
        return evil_torch if n.endswith(first_file) else b

    cases: dict[str, tuple[Callable[..., bytes | None], dict[str, bytes], str]] = {
        "sample-inputs": (
            lambda n, b: evil_torch if "sample_inputs/" in n else b,
            {},
            "holds pickled objects",
        ),
        "pickled-weight": (weight, {}, "holds pickled objects"),
        "tensor-constant": (
            tensor,
            {"data/constants/tensor_0": evil_torch},
            "holds pickled objects",
        ),
        "opaque-object": (
            opaque,
            {"data/constants/opaque_obj_0": evil_pickle},
            "pickled object constant",
        ),
        "aotinductor": (lambda n, b: b, {"data/aotinductor/model/x.cpp": b"int x;"}, "AOTInductor"),
        "missing-sample-inputs": (
            lambda n, b: None if "sample_inputs/" in n else b,
            {},
            "is missing",
        ),
        "missing-weight": (lambda n, b: None if n.endswith(first_file) else b, {}, "is missing"),
        "malformed-program": (
            lambda n, b: b"{nonsense" if "/models/" in n else b,
            {},
            "not a readable torch.export archive",
        ),
    }
    out = {
        name: (_rewrite(model, folder / f"{name}.pt2", fn, extra), says)
        for name, (fn, extra, says) in cases.items()
    }
    truncated = folder / "truncated.pt2"
    truncated.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    flat = folder / "flat.pt2"
    with zipfile.ZipFile(flat, "w") as z:
        z.writestr("version", "1")
    text = folder / "text.pt2"
    text.write_text("not an archive")
    out["truncated"] = (truncated, "is not a torch.export archive")
    out["flat-zip"] = (flat, "no single top folder")
    out["not-a-zip"] = (text, "is not a torch.export archive")
    return out


_CHILD = """
import json, sys
import numpy as np, torch
from bna_export.errors import ModelError
from bna_export.model import load_model
x = torch.from_numpy(np.load(sys.argv[1])["x"])
for path in json.loads(sys.argv[2]):
    try:
        load_model(path, None, x[:2], x)
    except ModelError as exc:
        print(exc, file=sys.stderr)
    else:
        print("loaded", path, file=sys.stderr)
"""


def test_every_hostile_archive_is_refused_with_one_line_and_no_payload(patch_files, tmp_path):
    # a child process: PyTorch's own log handler writes to the real stderr, which an in-process
    # capture does not see
    marker = tmp_path / "MARKER"
    cases = hostile_archives(patch_files["model"], tmp_path, marker)
    paths = [str(p) for p, _ in cases.values()]
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, str(patch_files["defender"]), json.dumps(paths)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == len(cases), res.stderr
    for line, (name, (path, says)) in zip(lines, cases.items(), strict=True):
        assert line.startswith(str(path)) and says in line, (name, line)
    assert not marker.exists()


def test_loads_from_four_threads_leave_the_environment_alone(patch_files, tmp_path, monkeypatch):
    marker = tmp_path / "MARKER"
    hostile = hostile_archives(patch_files["model"], tmp_path, marker)
    writes: list[str] = []

    class Watched(dict):
        def __setitem__(self, key, value):
            writes.append(key)
            super().__setitem__(key, value)

        def __delitem__(self, key):
            writes.append(key)
            super().__delitem__(key)

        def pop(self, key, *default):
            writes.append(key)
            return super().pop(key, *default)

    monkeypatch.setattr(os, "environ", Watched(os.environ))
    x = torch.from_numpy(np.load(patch_files["defender"])["x"])
    with torch.no_grad():
        reference = load_model(str(patch_files["model"]), None, x[:2], x)(x[:8])
    bad = [str(hostile[k][0]) for k in ("sample-inputs", "pickled-weight", "opaque-object")]
    errors: list[BaseException] = []
    outputs: list[torch.Tensor] = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                model = load_model(str(patch_files["model"]), None, x[:2], x)
                with torch.no_grad():
                    outputs.append(model(x[:8]))
                with pytest.raises(ModelError):
                    load_model(bad[i % len(bad)], None, x[:2], x)
        except BaseException as exc:  # reported below, in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(outputs) == 12 and all(torch.equal(o, reference) for o in outputs)
    assert not marker.exists()
    assert writes == []


def _program_rewritten(model: Path, dst: Path, change: Callable[[dict], None]) -> Path:
    def edit(name: str, data: bytes) -> bytes:
        if name.endswith("models/model.json"):
            program = json.loads(data)
            change(program)
            return json.dumps(program).encode()
        return data

    return _rewrite(model, dst, edit)


def code_in_the_program(model: Path, folder: Path, marker: Path) -> dict[str, tuple[Path, str]]:
    """Archives whose program JSON alone (no pickle) ran code in torch 2.13's loader, and
    members PyTorch's zip reader would find where Python's does not (found by review)."""
    run = f"open({str(marker)!r}, 'w')"

    def sympy(program: dict) -> None:
        size = program["graph_module"]["graph"]["tensor_values"]
        first = next(iter(size.values()))["sizes"][0]
        first["as_expr"] = {"expr_str": f"Symbol('s77', integer=True) if {run} else 0"}

    def higher_order(program: dict) -> None:
        node = program["graph_module"]["graph"]["nodes"][0]
        node["target"] = "torch.ops.higher_order.wrap"

    def argument_name(program: dict) -> None:
        node = program["graph_module"]["graph"]["nodes"][0]
        node["inputs"][-1]["name"] = f"other=1)\n{run}\n_z=dict(k"

    buf = io.BytesIO()
    torch.save((Payload(marker),), buf)
    with zipfile.ZipFile(model) as z:
        names = z.namelist()
        samples = next(n for n in names if "sample_inputs/" in n)
        clean = z.read(samples)
    case = _rewrite(model, folder / "case.pt2", lambda n, b: buf.getvalue() if n == samples else b)
    with zipfile.ZipFile(case, "a") as z:  # the clean copy under an upper-case name, last
        z.writestr(samples.replace("sample_inputs", "Sample_Inputs"), clean)
    return {
        "sympy-expression": (
            _program_rewritten(model, folder / "sympy.pt2", sympy),
            "symbolic size",
        ),
        "higher-order-op": (
            _program_rewritten(model, folder / "hop.pt2", higher_order),
            "only ATen operators",
        ),
        "argument-name": (
            _program_rewritten(model, folder / "argname.pt2", argument_name),
            "is not an identifier",
        ),
        "non-json-program": (
            _rewrite(model, folder / "models.pt2", extra={"models/evil_json": b"{}"}),
            "unexpected member",
        ),
        "names-equal-but-for-case": (case, "a member name is repeated"),
        "absolute-path-name": (
            _rewrite(model, folder / "abs.pt2", extra={"data/weights//w": b"x"}),
            "member name",
        ),
    }


def test_code_in_the_program_or_hidden_members_is_refused(patch_files, tmp_path):
    marker = tmp_path / "MARKER"
    cases = code_in_the_program(patch_files["model"], tmp_path, marker)
    x = torch.from_numpy(np.load(patch_files["defender"])["x"])
    for path, says in cases.values():
        with pytest.raises(ModelError, match=says):
            load_model(str(path), None, x[:2], x)
    assert not marker.exists()


def test_guard_code_and_legacy_members_are_dropped_not_run(patch_files, tmp_path):
    """What the loader does not need never reaches PyTorch: the program's guard code (which
    ``ep.module()`` runs as Python) and a legacy one-file weights pickle beside the config."""
    marker = tmp_path / "MARKER"
    run = f"open({str(marker)!r}, 'w')"
    guards = _program_rewritten(
        patch_files["model"],
        tmp_path / "guards.pt2",
        lambda p: p.update(guards_code=[f"1 #\n)\n{run}\ndef f(*a):\n  (1"]),
    )
    buf = io.BytesIO()
    torch.save((Payload(marker),), buf)
    legacy = _rewrite(
        patch_files["model"],
        tmp_path / "legacy.pt2",
        extra={"data/weights/model.pt": buf.getvalue()},
    )
    x = torch.from_numpy(np.load(patch_files["defender"])["x"])
    reference = load_model(str(patch_files["model"]), None, x[:2], x)
    for path in (guards, legacy):
        model = load_model(str(path), None, x[:2], x)
        with torch.no_grad():
            assert torch.equal(model(x[:4]), reference(x[:4]))
    assert not marker.exists()
