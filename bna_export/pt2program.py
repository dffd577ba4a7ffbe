"""The program JSON of a ``.pt2`` archive (``models/<name>.json``), checked and cleaned before
PyTorch deserialises it: torch 2.13 evaluates its symbolic sizes with ``sympy.sympify``, runs
its ``guards_code`` as Python in ``ep.module()``, and writes argument names and stack traces into
the Python source torch.fx generates and runs. A crafted program runs code through any of them
without a single pickle (found by review, 2026-12-05)."""

from __future__ import annotations

import ast
import json
import re
import threading
from typing import Any

from .errors import ModelError

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SYMBOL = re.compile(r"[a-z]+[0-9]+\Z")
_TARGET = re.compile(
    r"(torch\.ops\.aten\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+|_operator\.[a-z_]+|torch\.sym_[a-z]+)\Z"
)
_SYMPY = {
    *("Symbol", "Integer", "Max", "Min", "Mod", "PythonMod", "FloorDiv", "CeilDiv"),
    *("IntTrueDiv", "TruncToInt", "ToFloat", "Abs", "Pow", "Add", "Mul", "True", "False"),
}
AST_LOCK = threading.Lock()
"""Held while Python AST objects are built (our ``ast.parse``; PyTorch's loads, whose sympy
parses build them too): CPython 3.11 keeps the AST constructor's recursion depth in one
interpreter-wide state, and two threads building at once fail with "AST constructor recursion
depth mismatch" (a thread-loading test saw it once; CPython gh-106905)."""
_REFUSED_ARGS = {"as_operator", "as_custom_obj", "as_graph", "as_sym_float", "as_sym_floats"}
_ARITHMETIC = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.operator, ast.unaryop, ast.Load,
               ast.keyword)  # fmt: skip


def _plain(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return node.id in _SYMPY or _SYMBOL.match(node.id) is not None
    if isinstance(node, ast.Constant):
        value = node.value
        return isinstance(value, (int, bool)) or (
            isinstance(value, str) and _SYMBOL.match(value) is not None
        )
    if isinstance(node, ast.Call):
        return isinstance(node.func, ast.Name) and node.func.id in _SYMPY
    return isinstance(node, _ARITHMETIC)


def check_expression(text: str, spec: str) -> None:
    """Refuse a symbolic size unless it is plain arithmetic of symbols (``s77``), integers and
    sympy's integer functions (``Symbol('s77', positive=True)``, ``Max(2, s0)``…)."""
    try:
        with AST_LOCK:
            tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise ModelError(f"{spec}: a symbolic size is not an expression ({text[:60]!r})") from exc
    if not all(_plain(node) for node in ast.walk(tree)):
        raise ModelError(
            f"{spec}: a symbolic size is not plain arithmetic ({text[:60]!r}): PyTorch would "
            "evaluate it"
        )


def _walk(obj: Any, spec: str) -> None:
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "expr_str" and isinstance(value, str):
                check_expression(value, spec)
            elif key in _REFUSED_ARGS:
                raise ModelError(f"{spec}: the program holds an argument {key!r}: refused")
            _walk(value, spec)
    elif isinstance(obj, list):
        for value in obj:
            _walk(value, spec)


def clean_program(data: bytes, spec: str) -> bytes:
    """The program JSON PyTorch may read: node targets only ATen operators and Python's
    arithmetic on sizes, argument names Python identifiers, symbolic sizes plain arithmetic, no
    operator, custom-object or subgraph arguments; the guard code and every node's metadata
    but its ``nn_module_stack`` (a single printable line) dropped. Raises :class:`ModelError`."""
    try:
        program = json.loads(data)
        nodes = program["graph_module"]["graph"]["nodes"]
        if not isinstance(nodes, list) or not all(isinstance(n, dict) for n in nodes):
            raise TypeError("nodes")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ModelError(
            f"{spec} is not a readable torch.export archive ({type(exc).__name__})"
        ) from exc
    for node in nodes:
        target = node.get("target")
        if not isinstance(target, str) or not _TARGET.match(target):
            raise ModelError(
                f"{spec}: the program calls {str(target)[:80]!r}: only ATen operators are "
                "accepted (no higher-order or Python operators)"
            )
        for arg in node.get("inputs") or []:
            name = arg.get("name", "") if isinstance(arg, dict) else None
            if not isinstance(name, str) or (name and not _IDENTIFIER.match(name)):
                raise ModelError(f"{spec}: argument name {str(name)[:40]!r} is not an identifier")
        meta = node.get("metadata")
        stack = meta.get("nn_module_stack") if isinstance(meta, dict) else None
        keep = isinstance(stack, str) and stack.isprintable()
        node["metadata"] = {"nn_module_stack": stack} if keep else {}
    _walk(program, spec)
    program["guards_code"] = []
    return json.dumps(program).encode()
