"""Checked reads of a fit file's JSON header values: each returns the value with its type, or
raises :class:`~bna_export.errors.FitFileError` naming the field (a fit file is untrusted
input)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from ..errors import FitFileError

T = TypeVar("T")


def fail(what: str) -> FitFileError:
    return FitFileError(f"fit file: malformed header ({what})")


def read_int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise fail(f"{what} is not an integer")
    return v


def opt_int(v: Any, what: str) -> int | None:
    return None if v is None else read_int(v, what)


def read_float(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise fail(f"{what} is not a number")
    try:
        return float(v)
    except OverflowError:  # an integer beyond a float's range
        raise fail(f"{what} is out of range") from None


def opt_float(v: Any, what: str) -> float | None:
    return None if v is None else read_float(v, what)


def read_str(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise fail(f"{what} is not a string")
    return v


def read_bool(v: Any, what: str) -> bool:
    if not isinstance(v, bool):
        raise fail(f"{what} is not true or false")
    return v


def opt_bool(v: Any, what: str) -> bool | None:
    return None if v is None else read_bool(v, what)


def read_dict(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise fail(f"{what} is not an object")
    return v


def read_list(v: Any, what: str, item: Callable[[Any, str], T]) -> tuple[T, ...]:
    if not isinstance(v, list):
        raise fail(f"{what} is not a list")
    return tuple(item(x, f"{what}[{i}]") for i, x in enumerate(v))


def get(d: Mapping[str, Any], key: str, what: str) -> Any:
    if key not in d:
        raise fail(f"{what} has no {key!r}")
    return d[key]


def class_key(k: str, what: str) -> int:
    try:
        return int(k)
    except ValueError:
        raise fail(f"{what} key {k!r} is not a class number") from None


def pair_key(k: str, what: str) -> tuple[int, int]:
    s, sep, t = k.partition(":")
    if not sep:
        raise fail(f"{what} key {k!r} is not SOURCE:TARGET")
    return class_key(s, what), class_key(t, what)


def pair(v: Any, what: str) -> tuple[int, int]:
    p = read_list(v, what, read_int)
    if len(p) != 2:
        raise fail(f"{what} is not a [source, target] pair")
    return p[0], p[1]


def tensor(tensors: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...] | None) -> Any:
    if name not in tensors:
        raise FitFileError(f"fit file lacks the tensor {name!r}")
    arr = tensors[name]
    if shape is not None and arr.shape != shape:
        raise FitFileError(f"fit file: tensor {name!r} has shape {arr.shape}; expected {shape}")
    return arr
