"""What a fit file holds, as typed frozen records: the one writer and the one reader of the
header's layout and tensor names (:mod:`bna_export.artifact` owns the bytes). A record is
validated once when read; every other module uses the records, never the raw header."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from . import artifact
from .artifact import FitFile
from .errors import FitFileError, ModelError

if TYPE_CHECKING:
    from .model import BnaModel

T = TypeVar("T")


@dataclass(frozen=True)
class Layer:
    """One BN layer (or measured Conv/Gemm output) of f, its Θ for every target, and its
    fingerprint: the probes' per-channel means, which find the layer again in an ONNX graph."""

    index: int
    name: str
    channels: int
    eps: float
    measured: bool
    running_mean: np.ndarray
    running_var: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    theta: np.ndarray
    """[targets, 4, channels]: µ, σ, υ, ω per channel."""
    probe_mean: np.ndarray | None = None
    """[probes, channels]; absent in fit files written before ``build`` existed."""


@dataclass(frozen=True)
class Trigger:
    """A reverse-engineered trigger of a target (per-target estimate or sweep pair)."""

    index: int
    family: str
    target: int
    sources: tuple[int, ...]
    restart: int
    refresh_round: int
    size: float
    relative_size: float
    success: float
    steps: int
    used: bool
    """Θ was fitted on it."""
    params: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class PairScore:
    """One pair's (or, without a sweep, one trigger's) size, statistic and anomaly score."""

    source: int | None
    target: int
    size: float
    statistic: float
    score: float | None
    """None: not scored (no sweep), or an infinite score (MAD = 0)."""
    detected: bool | None
    weight: float | None = None
    """A screened sweep's weight of the pair in the weighted medians."""


@dataclass(frozen=True)
class Intrinsic:
    """The intrinsic-backdoor check of a target with several detected sources."""

    family: str
    pooled_size: float | None
    pair_sizes: dict[int, float]
    ratios: dict[str, float | None]
    kept: tuple[int, ...]
    dropped: tuple[int, ...]


@dataclass(frozen=True)
class Detection:
    """How the pairs were scored and what was found (empty when targets or pairs were given)."""

    rule: str
    normalise: str
    consistency: float
    threshold: float
    side: str
    scores_computed: bool
    pair_families: dict[tuple[int, int], str]
    detected_pairs: tuple[tuple[int, int], ...]
    all_to_one: dict[int, str]
    target_scores: dict[str, tuple[float | None, ...]]
    pooled_scores: dict[str, tuple[float | None, ...]]
    pooled_sizes: dict[str, tuple[float | None, ...]]
    intrinsic: dict[int, Intrinsic]
    sweep: dict[str, Any]
    """``exhaustive``, ``problems``, ``problem_steps`` and ``screen`` (what the screen found)."""


@dataclass(frozen=True)
class Probes:
    """Inputs with what f, every g_t and the routed classifier answered: ``build`` checks its
    graph against them."""

    x: np.ndarray
    f_logits: np.ndarray
    g_logits: np.ndarray
    label: np.ndarray
    triggered: np.ndarray
    logits: np.ndarray


@dataclass(frozen=True)
class FitRecord:
    """Everything one ``fit`` wrote."""

    tool_version: str
    mode: str
    """'detect' (no hint), 'targets' or 'pairs'."""
    n_classes: int
    model_format: str
    """'torch' (a .pt2 or a module) or 'onnx'."""
    input_shape: tuple[int, ...]
    input_range: tuple[float, float]
    sources: dict[int, tuple[int, ...]]
    """S(t) per target, in target order."""
    families: dict[int, str]
    scores: dict[str, tuple[PairScore, ...]]
    detection: Detection
    triggers: tuple[Trigger, ...]
    layers: tuple[Layer, ...]
    settings: dict[str, Any]
    history: tuple[float, ...]
    data_images: int
    data_sha256: str
    probes: Probes | None = None
    """None in fit files written before ``build`` existed."""

    @property
    def targets(self) -> list[int]:
        return list(self.sources)

    @property
    def attacked(self) -> bool:
        return bool(self.sources)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return [(s, t) for t, v in self.sources.items() for s in v]


# --- writing -----------------------------------------------------------------------------


def _finite(values: Any) -> list[float | None]:
    return [None if v is None or not np.isfinite(v) else float(v) for v in values]


def _score_json(p: PairScore) -> dict[str, Any]:
    out = {
        "source": p.source,
        "target": p.target,
        "size": p.size,
        "statistic": p.statistic,
        "score": p.score,
        "detected": p.detected,
    }
    if p.weight is not None:
        out["weight"] = p.weight
    return out


def _detection_json(d: Detection) -> dict[str, Any]:
    return {
        "rule": d.rule,
        "normalise": d.normalise,
        "consistency": d.consistency,
        "threshold": d.threshold,
        "side": d.side,
        "scores_computed": d.scores_computed,
        "pair_families": {f"{s}:{t}": f for (s, t), f in sorted(d.pair_families.items())},
        "detected_pairs": [list(p) for p in d.detected_pairs],
        "all_to_one": {str(t): f for t, f in d.all_to_one.items()},
        "target_scores": {f: _finite(v) for f, v in d.target_scores.items()},
        "pooled_scores": {f: _finite(v) for f, v in d.pooled_scores.items()},
        "pooled_sizes": {f: _finite(v) for f, v in d.pooled_sizes.items()},
        "intrinsic": {
            str(t): {
                "family": i.family,
                "pooled_size": i.pooled_size,
                "pair_sizes": {str(s): z for s, z in i.pair_sizes.items()},
                "ratios": dict(i.ratios),
                "kept": list(i.kept),
                "dropped": list(i.dropped),
            }
            for t, i in d.intrinsic.items()
        },
        "sweep": dict(d.sweep),
    }


def header_of(rec: FitRecord) -> dict[str, Any]:
    """The JSON header of a record (without the format version and tensor table, which
    :mod:`bna_export.artifact` adds)."""
    targets = rec.targets
    return {
        "tool": "bna-export",
        "tool_version": rec.tool_version,
        "mode": rec.mode,
        "attacked": rec.attacked,
        "n_classes": rec.n_classes,
        "model_format": rec.model_format,
        "input_shape": list(rec.input_shape),
        "input_range": [float(rec.input_range[0]), float(rec.input_range[1])],
        "targets": targets,
        "sources": {str(t): list(s) for t, s in rec.sources.items()},
        "pairs": [list(p) for p in rec.pairs],
        "families": {str(t): f for t, f in rec.families.items()},
        "scores": {f: [_score_json(p) for p in v] for f, v in rec.scores.items()},
        "detection": _detection_json(rec.detection),
        "triggers": [
            {
                "index": tr.index,
                "family": tr.family,
                "target": tr.target,
                "sources": list(tr.sources),
                "restart": tr.restart,
                "refresh_round": tr.refresh_round,
                "size": tr.size,
                "relative_size": tr.relative_size,
                "success": tr.success,
                "steps": tr.steps,
                "used": tr.used,
            }
            for tr in rec.triggers
        ],
        "layers": [
            {
                "index": la.index,
                "name": la.name,
                "channels": la.channels,
                "eps": la.eps,
                "measured": la.measured,
            }
            for la in rec.layers
        ],
        "settings": rec.settings,
        "history": list(rec.history),
        "data": {"images": rec.data_images, "sha256": rec.data_sha256},
    }


_LAYER_TENSORS = ("running_mean", "running_var", "weight", "bias")
_PROBE_TENSORS = {
    "x": np.float32,
    "f_logits": np.float32,
    "g_logits": np.float32,
    "label": np.int64,
    "triggered": np.bool_,
    "logits": np.float32,
}


def to_fit(rec: FitRecord) -> FitFile:
    """The fit file of a record (encode it with :func:`bna_export.artifact.encode`)."""
    tensors: dict[str, np.ndarray] = {}
    for la in rec.layers:
        for key in _LAYER_TENSORS:
            tensors[f"layer.{la.index}.{key}"] = np.asarray(getattr(la, key), np.float32)
        tensors[f"theta.{la.index}"] = np.asarray(la.theta, np.float32)
        if la.probe_mean is not None:
            tensors[f"layer.{la.index}.probe_mean"] = np.asarray(la.probe_mean, np.float32)
    for tr in rec.triggers:
        for key, value in tr.params.items():
            tensors[f"trigger.{tr.index}.{key}"] = np.asarray(value, np.float32)
    if rec.probes is not None:
        for key, dtype in _PROBE_TENSORS.items():
            tensors[f"probe.{key}"] = np.asarray(getattr(rec.probes, key), dtype)
    return FitFile(header_of(rec), tensors)


# --- reading -----------------------------------------------------------------------------


def _fail(what: str) -> FitFileError:
    return FitFileError(f"fit file: malformed header ({what})")


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(f"{what} is not an integer")
    return v


def _opt_int(v: Any, what: str) -> int | None:
    return None if v is None else _int(v, what)


def _float(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _fail(f"{what} is not a number")
    return v


def _opt_float(v: Any, what: str) -> float | None:
    return None if v is None else _float(v, what)


def _str(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise _fail(f"{what} is not a string")
    return v


def _bool(v: Any, what: str) -> bool:
    if not isinstance(v, bool):
        raise _fail(f"{what} is not true or false")
    return v


def _opt_bool(v: Any, what: str) -> bool | None:
    return None if v is None else _bool(v, what)


def _dict(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _fail(f"{what} is not an object")
    return v


def _list(v: Any, what: str, item: Callable[[Any, str], T]) -> tuple[T, ...]:
    if not isinstance(v, list):
        raise _fail(f"{what} is not a list")
    return tuple(item(x, f"{what}[{i}]") for i, x in enumerate(v))


def _get(d: Mapping[str, Any], key: str, what: str) -> Any:
    if key not in d:
        raise _fail(f"{what} has no {key!r}")
    return d[key]


def _class_key(k: str, what: str) -> int:
    try:
        return int(k)
    except ValueError:
        raise _fail(f"{what} key {k!r} is not a class number") from None


def _pair_key(k: str, what: str) -> tuple[int, int]:
    s, sep, t = k.partition(":")
    if not sep:
        raise _fail(f"{what} key {k!r} is not SOURCE:TARGET")
    return _class_key(s, what), _class_key(t, what)


def _pair(v: Any, what: str) -> tuple[int, int]:
    p = _list(v, what, _int)
    if len(p) != 2:
        raise _fail(f"{what} is not a [source, target] pair")
    return p[0], p[1]


def _tensor(tensors: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...] | None) -> Any:
    if name not in tensors:
        raise FitFileError(f"fit file lacks the tensor {name!r}")
    arr = tensors[name]
    if shape is not None and arr.shape != shape:
        raise FitFileError(f"fit file: tensor {name!r} has shape {arr.shape}; expected {shape}")
    return arr


def _score(v: Any, what: str) -> PairScore:
    d = _dict(v, what)
    return PairScore(
        _opt_int(_get(d, "source", what), f"{what}.source"),
        _int(_get(d, "target", what), f"{what}.target"),
        _float(_get(d, "size", what), f"{what}.size"),
        _float(_get(d, "statistic", what), f"{what}.statistic"),
        _opt_float(_get(d, "score", what), f"{what}.score"),
        _opt_bool(_get(d, "detected", what), f"{what}.detected"),
        _opt_float(d.get("weight"), f"{what}.weight"),
    )


def _intrinsic(v: Any, what: str) -> Intrinsic:
    d = _dict(v, what)
    sizes = _dict(_get(d, "pair_sizes", what), f"{what}.pair_sizes")
    ratios = _dict(_get(d, "ratios", what), f"{what}.ratios")
    return Intrinsic(
        _str(_get(d, "family", what), f"{what}.family"),
        _opt_float(_get(d, "pooled_size", what), f"{what}.pooled_size"),
        {_class_key(s, what): _float(z, f"{what}.pair_sizes") for s, z in sizes.items()},
        {_str(f, what): _opt_float(r, f"{what}.ratios") for f, r in ratios.items()},
        _list(_get(d, "kept", what), f"{what}.kept", _int),
        _list(_get(d, "dropped", what), f"{what}.dropped", _int),
    )


def _per_family(v: Any, what: str) -> dict[str, tuple[float | None, ...]]:
    return {f: _list(x, f"{what}.{f}", _opt_float) for f, x in _dict(v, what).items()}


def _detection(v: Any) -> Detection:
    w = "detection"
    d = _dict(v, w)
    families = _dict(_get(d, "pair_families", w), "detection.pair_families")
    return Detection(
        _str(_get(d, "rule", w), "detection.rule"),
        _str(_get(d, "normalise", w), "detection.normalise"),
        _float(_get(d, "consistency", w), "detection.consistency"),
        _float(_get(d, "threshold", w), "detection.threshold"),
        _str(_get(d, "side", w), "detection.side"),
        _bool(_get(d, "scores_computed", w), "detection.scores_computed"),
        {_pair_key(k, w): _str(f, "detection.pair_families") for k, f in families.items()},
        _list(_get(d, "detected_pairs", w), "detection.detected_pairs", _pair),
        {
            _class_key(t, w): _str(f, "detection.all_to_one")
            for t, f in _dict(_get(d, "all_to_one", w), "detection.all_to_one").items()
        },
        _per_family(_get(d, "target_scores", w), "detection.target_scores"),
        _per_family(d.get("pooled_scores", {}), "detection.pooled_scores"),
        _per_family(d.get("pooled_sizes", {}), "detection.pooled_sizes"),
        {
            _class_key(t, w): _intrinsic(i, f"detection.intrinsic.{t}")
            for t, i in _dict(_get(d, "intrinsic", w), "detection.intrinsic").items()
        },
        _dict(_get(d, "sweep", w), "detection.sweep"),
    )


def _trigger(v: Any, what: str, tensors: Mapping[str, np.ndarray]) -> Trigger:
    d = _dict(v, what)
    index = _int(_get(d, "index", what), f"{what}.index")
    prefix = f"trigger.{index}."
    return Trigger(
        index,
        _str(_get(d, "family", what), f"{what}.family"),
        _int(_get(d, "target", what), f"{what}.target"),
        _list(_get(d, "sources", what), f"{what}.sources", _int),
        _int(_get(d, "restart", what), f"{what}.restart"),
        _int(d.get("refresh_round", 0), f"{what}.refresh_round"),
        _float(_get(d, "size", what), f"{what}.size"),
        _float(_get(d, "relative_size", what), f"{what}.relative_size"),
        _float(_get(d, "success", what), f"{what}.success"),
        _int(_get(d, "steps", what), f"{what}.steps"),
        _bool(_get(d, "used", what), f"{what}.used"),
        {k.removeprefix(prefix): a for k, a in tensors.items() if k.startswith(prefix)},
    )


def _layer(
    v: Any, i: int, n_targets: int, n_probes: int | None, tensors: Mapping[str, np.ndarray]
) -> Layer:
    what = f"layers[{i}]"
    d = _dict(v, what)
    c = _int(_get(d, "channels", what), f"{what}.channels")
    stats = [_tensor(tensors, f"layer.{i}.{k}", (c,)) for k in _LAYER_TENSORS]
    theta = _tensor(tensors, f"theta.{i}", (n_targets, 4, c))
    probe = tensors.get(f"layer.{i}.probe_mean")
    if probe is not None and (n_probes is None or probe.shape != (n_probes, c)):
        raise FitFileError(f"fit file: tensor 'layer.{i}.probe_mean' has shape {probe.shape}")
    return Layer(
        i,
        _str(_get(d, "name", what), f"{what}.name"),
        c,
        _float(_get(d, "eps", what), f"{what}.eps"),
        _bool(d.get("measured", False), f"{what}.measured"),
        *stats,
        theta,
        probe,
    )


def _probes(tensors: Mapping[str, np.ndarray], n_targets: int) -> Probes | None:
    names = [f"probe.{k}" for k in _PROBE_TENSORS]
    if not all(n in tensors for n in names):
        return None
    p = Probes(*(tensors[n] for n in names))
    n = len(p.x)
    per_probe = [p.f_logits, p.label, p.triggered, p.logits]
    if any(len(a) != n for a in per_probe) or p.g_logits.shape[:2] != (n_targets, n):
        raise FitFileError("fit file: the probe tensors disagree in length")
    return p


def read(fit: FitFile) -> FitRecord:
    """The record of a decoded fit file; raises :class:`FitFileError` on anything missing or
    of the wrong type or shape (a fit file is untrusted input)."""
    h, t = fit.header, fit.tensors
    try:
        targets = _list(_get(h, "targets", "header"), "targets", _int)
        raw_sources = _dict(_get(h, "sources", "header"), "sources")
        sources = {
            c: _list(_get(raw_sources, str(c), "sources"), f"sources.{c}", _int) for c in targets
        }
        raw_families = _dict(h.get("families", {}), "families")
        shape = _list(_get(h, "input_shape", "header"), "input_shape", _int)
        lo, hi = _list(_get(h, "input_range", "header"), "input_range", _float)
        probes = _probes(t, len(targets))
        layers = _list(_get(h, "layers", "header"), "layers", lambda v, _w: v)
        rec = FitRecord(
            _str(h.get("tool_version", "unknown"), "tool_version"),
            _str(_get(h, "mode", "header"), "mode"),
            _int(_get(h, "n_classes", "header"), "n_classes"),
            _str(h.get("model_format", "torch"), "model_format"),
            shape,
            (lo, hi),
            sources,
            {c: _str(raw_families.get(str(c), ""), "families") for c in targets},
            {
                f: _list(v, f"scores.{f}", _score)
                for f, v in _dict(_get(h, "scores", "header"), "scores").items()
            },
            _detection(_get(h, "detection", "header")),
            _list(_get(h, "triggers", "header"), "triggers", lambda v, w: _trigger(v, w, t)),
            tuple(
                _layer(v, i, len(targets), None if probes is None else len(probes.x), t)
                for i, v in enumerate(layers)
            ),
            _dict(_get(h, "settings", "header"), "settings"),
            _list(h.get("history", []), "history", _float),
            _int(_dict(h.get("data", {}), "data").get("images", 0), "data.images"),
            _str(_dict(h.get("data", {}), "data").get("sha256", ""), "data.sha256"),
            probes,
        )
    except ValueError as exc:  # e.g. input_range of the wrong length
        raise _fail(str(exc)) from exc
    return rec


def load(path: str | Path) -> FitRecord:
    """Read, check and validate a fit file."""
    return read(artifact.load(path))


# --- the mitigated classifier's view ------------------------------------------------------


@dataclass
class Mitigation:
    """The parts of a fit file that the mitigated classifier needs."""

    targets: list[int]
    thetas: list[torch.Tensor]
    n_classes: int
    input_shape: tuple[int, ...]
    input_range: tuple[float, float]
    layers: tuple[Layer, ...] = ()
    model_format: str = "torch"

    @classmethod
    def from_record(cls, rec: FitRecord) -> Mitigation:
        return cls(
            rec.targets,
            [torch.from_numpy(np.array(la.theta)) for la in rec.layers],
            rec.n_classes,
            rec.input_shape,
            rec.input_range,
            rec.layers,
            rec.model_format,
        )

    @classmethod
    def from_fit(cls, fit: FitFile) -> Mitigation:
        return cls.from_record(read(fit))

    def check_model(self, model: BnaModel) -> None:
        """Fail unless ``model`` has the BN layers (same statistics) the fit was made on. A
        measured layer (an ONNX model's Conv/Gemm output) takes the fit file's statistics, so
        that h works in the units Θ was fitted in."""
        if self.model_format != model.source:
            kinds = {"onnx": "an .onnx file", "torch": "a .pt2 or a PyTorch module"}
            made = kinds.get(self.model_format, self.model_format)
            raise ModelError(
                f"the fit file was made from {made} and this model is "
                f"{kinds.get(model.source, model.source)}: evaluate with the kind of model it was "
                "fitted on, or `build` the graph and evaluate that"
            )
        if len(self.layers) != len(model.layers):
            raise ModelError(
                f"the fit file has {len(self.layers)} BatchNorm layers, the model "
                f"{len(model.layers)}: this is not the model that was fitted"
            )
        for i, (rec, la) in enumerate(zip(self.layers, model.layers, strict=True)):
            if la.measured and rec.measured and rec.name == la.name and rec.channels == la.channels:
                la.set_statistics(torch.from_numpy(rec.running_mean), torch.from_numpy(rec.weight))
                continue
            if (
                la.measured
                or rec.channels != la.channels
                or not np.allclose(rec.running_mean, la.running_mean.numpy(), rtol=1e-5, atol=1e-6)
            ):
                raise ModelError(
                    f"BatchNorm layer {i} ({rec.name}) differs from the fit "
                    "file's: this is not the model that was fitted"
                )
