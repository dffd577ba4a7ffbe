"""Evaluating a model and its BNA-mitigated version (the PyTorch reference) on clean and
triggered sets: input checks, routed predictions, and the five metrics."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import fitfile
from .data import Dataset, check_against_model, load_data, load_npz
from .defend import model_output_classes
from .errors import BadInputError
from .fitfile import Mitigation
from .metrics import compute_metrics
from .mitigated import predict_mitigated
from .model import load_model_for
from .norm import BnaModel
from .onnxfile import is_built, load_built
from .runtime import Provider, open_built, ran_on


@dataclass
class Evaluation:
    """Metrics per variant ('model', and 'mitigated' when a fit was given)."""

    results: dict[str, dict[str, float | None]]
    targets: list[int]
    clean_images: int
    triggered_images: int
    extra: dict[str, object] = field(default_factory=dict)
    evaluated: str = "model"
    """'mitigated' (a fit was given, or a built graph) or 'model' (f alone)."""

    @property
    def main(self) -> dict[str, float | None]:
        return self.results.get("mitigated", self.results["model"])


def evaluate(
    model_spec: str,
    weights: str | None,
    clean_path: str | Path,
    triggered_path: str | Path | None = None,
    fit_path: str | Path | None = None,
    provider: Provider = "auto",
    batch: int = 256,
    allow_graph_logic: bool = False,
) -> Evaluation:
    """``evaluate`` as the command line runs it: a built graph (an .onnx made by ``build``) in
    ONNX Runtime, or any other model as the PyTorch reference, mitigated with ``fit_path``
    (an .onnx with graph logic only with ``allow_graph_logic``, as ``fit`` takes it)."""
    built = str(model_spec).endswith(".onnx") and is_built(model_spec)
    if built and (fit_path is not None or weights is not None):
        raise BadInputError("a built .onnx graph holds its fit: drop --fit and --weights")
    clean = load_data(clean_path)
    trig, attack = None, None
    if triggered_path is not None:
        trig, more = load_npz(triggered_path, extra=("attack_label",))
        attack = more["attack_label"]
    if built:
        return evaluate_built(model_spec, clean, trig, attack, provider, batch=batch)
    model = load_model_for(model_spec, weights, clean, allow_graph_logic=allow_graph_logic)
    mitigation = None
    if fit_path is not None:
        mitigation = Mitigation.from_record(fitfile.load(fit_path))
        mitigation.check_model(model)
    return evaluate_reference(model, clean, trig, attack, mitigation, batch=batch)


def evaluate_built(
    path: str | Path,
    clean: Dataset,
    triggered: Dataset | None = None,
    attack_label: np.ndarray | None = None,
    provider: Provider = "cpu",
    batch: int = 256,
) -> Evaluation:
    """Evaluate a built graph in ONNX Runtime: 'mitigated' from its outputs, 'model' from f's
    own logits inside it (named by its ``bna.f_logits`` metadata)."""
    sess, meta = open_built(load_built(path, with_f_logits=True), provider)
    inp = sess.get_inputs()[0]
    k = sess.get_outputs()[2].shape[-1]
    dims = inp.shape[1:]
    shape = tuple(d if isinstance(d, int) else -1 for d in dims)
    if len(dims) == clean.x.ndim - 1:  # symbolic dims take whatever the data has
        shape = tuple(d if d != -1 else n for d, n in zip(shape, clean.x.shape[1:], strict=True))
    for name, ds in (("clean set", clean), ("triggered set", triggered)):
        if ds is not None:
            check_against_model(ds, shape, k if isinstance(k, int) else 2**31, name)
    targets = json.loads(meta.get("bna.targets", "[]"))
    if triggered is not None and attack_label is None:
        raise BadInputError("the triggered set has no attack_label")
    eval_targets = sorted({int(a) for a in attack_label}) if attack_label is not None else targets

    def predict(x: np.ndarray) -> tuple[np.ndarray, ...]:
        parts = [sess.run(None, {inp.name: x[i : i + batch]}) for i in range(0, len(x), batch)]
        label, flag, _, f_logits = (np.concatenate(p) for p in zip(*parts, strict=True))
        return label, flag, f_logits.argmax(1)

    pc = predict(clean.x)
    pt = predict(triggered.x) if triggered is not None else None
    results = {}
    for name, li, fi in (("model", 2, None), ("mitigated", 0, 1)):
        results[name] = compute_metrics(
            pc[li],
            clean.y,
            None if fi is None else pc[fi],
            pt[li] if pt else None,
            triggered.y if triggered else None,
            attack_label,
            None if (pt is None or fi is None) else pt[fi],
            eval_targets,
        )
    extra = {"provider": ran_on(sess), "fit_targets": targets}
    n_trig = len(triggered) if triggered else 0
    return Evaluation(results, eval_targets, len(clean), n_trig, extra, "mitigated")


def evaluate_reference(
    model: BnaModel,
    clean: Dataset,
    triggered: Dataset | None = None,
    attack_label: np.ndarray | None = None,
    mitigation: Mitigation | None = None,
    batch: int = 256,
) -> Evaluation:
    """Evaluate f (and g with routing when ``mitigation`` is given).

    FPR is measured on clean images of the attack's target classes: the distinct
    ``attack_label`` values, or the fit's targets when there is no triggered set.
    """
    k = model_output_classes(model, clean.x)
    if mitigation is not None and mitigation.n_classes != k:
        raise BadInputError(
            f"the fit file is for {mitigation.n_classes} classes, the model has {k}"
        )
    for name, ds in (("clean set", clean), ("triggered set", triggered)):
        if ds is not None:
            check_against_model(ds, clean.x.shape[1:], k, name)
    if triggered is not None and attack_label is None:
        raise BadInputError("the triggered set has no attack_label")
    if attack_label is not None and attack_label.max() >= k:
        raise BadInputError(f"attack label {int(attack_label.max())} but the model has {k} classes")
    if attack_label is not None:
        targets = sorted({int(a) for a in attack_label})
    else:
        targets = list(mitigation.targets) if mitigation else []
    variants: list[tuple[str, list[int], list[torch.Tensor] | None]] = [("model", [], None)]
    if mitigation is not None:
        variants.append(("mitigated", mitigation.targets, mitigation.thetas))
    results = {}
    for name, fit_targets, thetas in variants:
        mitigated = thetas is not None
        routing = mitigation.routing if mitigation is not None and mitigated else None
        pc = predict_mitigated(model, fit_targets, thetas, clean.x, batch, routing)
        pt = (
            predict_mitigated(model, fit_targets, thetas, triggered.x, batch, routing)
            if triggered
            else None
        )
        results[name] = compute_metrics(
            pc.label,
            clean.y,
            pc.triggered if mitigated else None,
            pt.label if pt else None,
            triggered.y if triggered else None,
            attack_label,
            pt.triggered if (pt and mitigated) else None,
            targets,
        )
    n_trig = len(triggered) if triggered else 0
    evaluated = "mitigated" if mitigation is not None else "model"
    return Evaluation(results, targets, len(clean), n_trig, evaluated=evaluated)
