"""The ``bna-export`` command line: parse, call the library, print. Errors from the library
(:class:`bna_export.BnaError`) become one line on stderr and exit code 2."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import click
import numpy as np
import torch

from bna_export import __version__, artifact, distributed, fitfile, onnxfile, report
from bna_export.data import Dataset, load_data, load_inputs, load_npz
from bna_export.defend import fit_defence
from bna_export.errors import BadInputError, BnaError
from bna_export.evaluation import evaluate_built, evaluate_reference
from bna_export.export import build_graph
from bna_export.fitfile import Mitigation
from bna_export.model import BnaModel, load_model
from bna_export.runtime import check_inputs, open_built, ran_on, run_built
from bna_export.settings import (
    DetectSettings,
    FitSettings,
    ReverseSettings,
    Settings,
    with_overrides,
)
from bna_export.triton import write_triton_repo


class BnaGroup(click.Group):
    """Turns library errors and bad options into one line on stderr and exit 2, Ctrl-C into
    exit 130."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BnaError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except click.UsageError as exc:  # a bad option: one line, and where the help is
            where = exc.ctx.command_path if exc.ctx else ctx.command_path
            click.echo(f"error: {exc.format_message()} (see {where} --help)", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was written", err=True)
            ctx.exit(130)


class Progress:
    """One click progress bar per stage on stderr; silent when quiet or not a terminal."""

    LABELS: ClassVar[dict[str, str]] = {
        "screen": "screening every source and target",
        "sweep": "reverse-engineering class pairs",
        "reverse": "reverse-engineering per target",
        "fit": "fitting Θ",
        "run": "running the graph",
    }

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.stage: str | None = None
        self.done = 0
        self.note = ""

    def __call__(self, stage: str, done: int, total: int, note: str = "") -> None:
        if not self.enabled:
            return
        if stage != self.stage:
            self.close()
            self.stage, self.done = stage, 0
            self.bar = click.progressbar(
                length=total,
                label=self.LABELS.get(stage, stage),
                file=sys.stderr,
                show_eta=True,
                item_show_func=lambda _item: self.note or None,
            )
            self.bar.__enter__()
        self.note = note
        self.bar.update(max(0, done - self.done))
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def common(f: Callable[..., Any]) -> Callable[..., Any]:
    """The flags every command shares: --json, --quiet."""

    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
    @click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return f(*args, **kwargs)

    return wrapper


weights_option = click.option(
    "--weights",
    type=click.Path(dir_okay=False),
    help="State dict (.pt, loaded with weights_only=True) for a package.module:callable model.",
)


provider_option = click.option(
    "--provider",
    type=click.Choice(["auto", "cuda", "cpu"]),
    default="auto",
    show_default=True,
    help="ONNX Runtime execution provider for .onnx graphs; auto takes CUDA when present.",
)


def _int_list(value: str | None, what: str) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise BadInputError(f"{what} {value!r}: expected comma-separated class numbers") from exc


def _pairs(value: str | None) -> list[tuple[int, int]] | None:
    if value is None:
        return None
    out = []
    for item in value.split(","):
        s, sep, t = item.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            out.append((int(s), int(t)))
        except ValueError as exc:
            raise BadInputError(f"--pairs item {item!r}: expected SOURCE:TARGET") from exc
    return out


def _range(value: str | None) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value.split(","))
    except ValueError as exc:
        raise BadInputError(f"--input-range {value!r}: expected LO,HI") from exc
    return lo, hi


def _load(model: str, weights: str | None, data: Dataset, device: Any = "cpu") -> BnaModel:
    x = torch.from_numpy(data.x)
    return load_model(model, weights, x[:2], x, device)


def _emit(obj: dict[str, Any]) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


@click.group(cls=BnaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bna-export")
def cli() -> None:
    """Find a backdoor in an image classifier, repair it without changing a trained weight
    (BNA), and check the repair.

    \b
    Typical use:
      bna-export fit --model net.pt2 --data clean.npz -o net.bna
      bna-export inspect net.bna
      bna-export evaluate net.pt2 --fit net.bna --clean test.npz --triggered trig.npz
    """


@cli.command()
@click.option(
    "--model",
    "model_spec",
    required=True,
    help="A .pt2 file (torch.export.save), package.module:callable, or the deployed .onnx "
    "(then h goes on its BatchNormalization, Conv and Gemm outputs, and `build` on the same "
    ".onnx finds the layers by name).",
)
@weights_option
@click.option(
    "--data",
    "data_path",
    required=True,
    type=click.Path(),
    help="Clean labelled images: .npz with x (N×C×H×W) and y, or a folder per class.",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="Fit file to write (.bna).",
)
@click.option(
    "--targets",
    help="Skip detection: repair these target classes, e.g. 3,5 (sources: all others).",
)
@click.option("--pairs", help="Skip detection: repair these source:target pairs, e.g. 0:1,4:5.")
@click.option(
    "--trigger-type",
    type=click.Choice(["patch", "perturbation", "blend", "warp", "both"]),
    default="both",
    show_default=True,
    help="Trigger family to reverse-engineer, or both: every family of the settings "
    "`families` (per target) and `detect_families` (sweep), as the defender does not know.",
)
@click.option(
    "--divergence",
    type=click.Choice(["tv", "js", "kl"]),
    default="tv",
    show_default=True,
    help="Divergence between clean and corrected histograms.",
)
@click.option(
    "--mad-threshold",
    type=click.FloatRange(0, min_open=True),
    default=DetectSettings.mad_threshold,
    show_default=True,
    help="Anomaly-score threshold of detection (3 suits warping triggers).",
)
@click.option(
    "--epochs",
    type=click.IntRange(1),
    default=FitSettings.epochs,
    show_default=True,
    help="Epochs of Θ fitting.",
)
@click.option(
    "--restarts",
    type=click.IntRange(1),
    default=ReverseSettings.restarts,
    show_default=True,
    help="Independent trigger estimates per target and family for fitting.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.FIELD=VALUE",
    help="Any other setting of bna_export/settings.py, e.g. --set reverse.steps=500 "
    "--set detect.normalise=none (repeatable).",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where to compute: auto takes the GPU when PyTorch sees one; under torchrun each "
    "rank takes the GPU of its LOCAL_RANK (one rank per GPU).",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of every random choice; the same inputs and seed give the same fit file.",
)
@click.option(
    "--input-range", help="LO,HI of the model's input (default: 0,1 widened to the data's range)."
)
@common
def fit(
    model_spec: str,
    weights: str | None,
    data_path: str,
    output: str,
    targets: str | None,
    pairs: str | None,
    trigger_type: str,
    divergence: str,
    mad_threshold: float,
    epochs: int,
    restarts: int,
    overrides: tuple[str, ...],
    device: str,
    seed: int,
    input_range: str | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Find out whether the model is backdoored and fit the BNA correction Θ_t for each
    attacked target class.

    \b
    Without --targets or --pairs, a trigger is reverse-engineered for every ordered class
    pair (K·(K-1) problems, both trigger families, one batch) and the pairs whose trigger is
    anomalously small are detected (MAD score above --mad-threshold). Nothing detected: the
    fit file says so and the model is served unchanged.

    \b
    The pair sweep runs sharded over processes with torchrun, each rank a slice of the pairs
    (same result as one process):
      torchrun --nproc-per-node 2 -m bna_export.cli.main fit --model m.pt2 --data d.npz -o m.bna
    """
    tlist, plist = _int_list(targets, "--targets"), _pairs(pairs)
    if tlist is not None and plist is not None:
        raise BadInputError("give at most one of --targets and --pairs")
    artifact.check_folder(output)
    base = Settings()
    settings = dataclasses.replace(
        base,
        trigger_type=trigger_type,
        seed=seed,
        fit=dataclasses.replace(base.fit, divergence=divergence, epochs=epochs),
        reverse=dataclasses.replace(base.reverse, restarts=restarts),
        detect=dataclasses.replace(base.detect, mad_threshold=mad_threshold),
    )
    settings = with_overrides(settings, overrides)
    where = distributed.resolve_device(device)
    data = load_data(data_path)
    model = _load(model_spec, weights, data, where)
    shard = distributed.start(where)
    progress = Progress(enabled=shard.primary and not quiet and sys.stderr.isatty())
    start = time.perf_counter()
    try:
        outcome = fit_defence(
            model,
            data,
            targets=tlist,
            pairs=plist,
            settings=settings,
            input_range=_range(input_range),
            progress=progress,
            shard=shard,
        )
    finally:
        progress.close()
        distributed.stop(shard)
    if outcome is None:  # another rank writes the results
        return
    digest = artifact.save(output, outcome.fit)
    seconds = time.perf_counter() - start
    if as_json:
        _emit(
            {
                "output": output,
                "sha256": digest,
                "seconds": round(seconds, 2),
                **report.fit_summary(outcome.record),
                "ranks": shard.world,
                "device": str(where),
            }
        )
        return
    click.echo("\n".join(report.fit_lines(outcome.record, output, seconds)))


@cli.command()
@click.argument("fit_path", metavar="FIT.bna", type=click.Path())
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    help="Also write a PNG of the anomaly-score histograms (needs matplotlib).",
)
@common
def inspect(fit_path: str, plot_path: str | None, as_json: bool, quiet: bool) -> None:
    """Show what a fit file holds: whether an attack was detected, the anomaly scores of the
    class pairs, targets, sources, triggers, layers and settings."""
    rec = fitfile.load(fit_path)
    if plot_path is not None:
        artifact.check_folder(plot_path)
        report.plot_scores(rec.scores, rec.detection, plot_path)
    if as_json:
        _emit(report.summary(rec, fit_path))
        return
    click.echo("\n".join(report.inspect_lines(rec, fit_path)))
    if plot_path is not None:
        click.echo(f"plot -> {plot_path}")


@cli.command()
@click.argument("model_spec", metavar="MODEL")
@weights_option
@click.option(
    "--clean",
    "clean_path",
    required=True,
    type=click.Path(),
    help="Clean test images (.npz with x, y, or a folder per class).",
)
@click.option(
    "--triggered",
    "trig_path",
    type=click.Path(),
    help=".npz with triggered x, true source y, and attack_label.",
)
@click.option(
    "--fit",
    "fit_path",
    type=click.Path(),
    help="Fit file: evaluate the mitigated "
    "classifier (PyTorch reference) instead of the model alone.",
)
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True)
@provider_option
@common
def evaluate(
    model_spec: str,
    weights: str | None,
    clean_path: str,
    trig_path: str | None,
    fit_path: str | None,
    batch_size: int,
    provider: str,
    as_json: bool,
    quiet: bool,
) -> None:
    """ACC, ASR, SIA, TPR, FPR of a model, or of its BNA-mitigated version with --fit.

    MODEL may also be a graph made by `build` (OUT.onnx, run in ONNX Runtime with --provider):
    the 'model' column is then f inside it, the other column the routed graph. A plain
    model.onnx (f as exported) runs as the PyTorch reference, like a .pt2.

    FPR is the share of clean images of the attack's target classes (the attack labels of
    --triggered; without it the fit's targets) that get flagged.
    """
    built = model_spec.endswith(".onnx") and onnxfile.is_built(model_spec)
    if built and (fit_path is not None or weights is not None):
        raise BadInputError("a built .onnx graph holds its fit: drop --fit and --weights")
    clean = load_data(clean_path)
    trig, attack = None, None
    if trig_path is not None:
        trig, more = load_npz(trig_path, extra=("attack_label",))
        attack = more["attack_label"]
    mitigation = None
    if built:
        ev = evaluate_built(model_spec, clean, trig, attack, provider, batch=batch_size)
    else:
        model = _load(model_spec, weights, clean)
        if fit_path is not None:
            mitigation = Mitigation.from_record(fitfile.load(fit_path))
            mitigation.check_model(model)
        ev = evaluate_reference(model, clean, trig, attack, mitigation, batch=batch_size)
    if as_json:
        _emit(
            {
                **ev.main,
                "model": ev.results["model"],
                **ev.extra,
                "evaluated": "mitigated" if (mitigation or built) else "model",
                "targets": ev.targets,
                "clean_images": ev.clean_images,
                "triggered_images": ev.triggered_images,
            }
        )
        return
    cols = list(ev.results)
    click.echo(f"{'metric':<8}" + "".join(f"{c:>12}" for c in cols))
    for key in ("acc", "asr", "sia", "tpr", "fpr"):
        cells = [ev.results[c][key] for c in cols]
        click.echo(
            f"{key.upper():<8}" + "".join(f"{'-' if v is None else f'{v:.4f}':>12}" for v in cells)
        )


@cli.command()
@click.argument("onnx_path", metavar="MODEL.onnx", type=click.Path())
@click.option(
    "--fit", "fit_path", required=True, type=click.Path(), help="The fit file (from `fit`)."
)
@click.option(
    "-o",
    "--output",
    "out_path",
    required=True,
    type=click.Path(),
    help="Where to write the built graph (one .onnx, weights inline).",
)
@click.option(
    "--triton-repo",
    type=click.Path(file_okay=False),
    help="Also write a Triton model repository here: <name>/1/model.onnx and config.pbtxt.",
)
@click.option(
    "--triton-name", help="Model name in the Triton repository (default: OUT.onnx's stem)."
)
@click.option(
    "--max-batch-size",
    type=click.IntRange(1),
    default=64,
    show_default=True,
    help="Triton's max_batch_size (dynamic batching).",
)
@common
def build(
    onnx_path: str,
    fit_path: str,
    out_path: str,
    triton_repo: str | None,
    triton_name: str | None,
    max_batch_size: int,
    as_json: bool,
    quiet: bool,
) -> None:
    """Rewrite MODEL.onnx (the f you deploy) into one graph with f, every g_t and the routing.

    The BN layers of the fit are found in the graph by value (folded into Conv/Gemm or kept as
    BatchNormalization). The result is run in ONNX Runtime on the fit file's probe inputs and
    written only when it agrees with the PyTorch reference (exit 2 and nothing written if not).
    Outputs: label int64 [N], triggered bool [N], logits float [N, K].
    """
    fit = artifact.load(fit_path)
    artifact.check_folder(out_path)
    t0 = time.perf_counter()
    built = build_graph(onnx_path, fit)
    artifact.write_atomic(out_path, built.data)
    triton = None
    if triton_repo is not None:
        name = triton_name or Path(out_path).stem
        triton = str(write_triton_repo(triton_repo, name, built.data, max_batch_size))
    info = {
        "output": out_path,
        "triton": triton,
        "bytes": len(built.data),
        "attacked": bool(built.targets),
        "targets": built.targets,
        "layers": built.layers,
        "found_by": built.found_by,
        "self_check": {"probes": built.probes, "max_logit_error": built.max_logit_error},
        "seconds": time.perf_counter() - t0,
    }
    if as_json:
        _emit(info)
        return
    if not built.targets:
        click.echo("no backdoor in the fit file: the graph is f plus label/triggered/logits")
    else:
        how = (
            "by name (the fit was made from this .onnx)" if built.found_by == "name" else "by value"
        )
        click.echo(f"targets {built.targets}; BatchNorm layers found in the graph {how}:")
        for la in built.layers:
            click.echo(f"  {la['name']:<24} -> {la['node']} {la['tensor']!r}")
    click.echo(
        f"self-check: {built.probes} probes agree with the PyTorch reference "
        f"(logits within {built.max_logit_error:.1e})"
    )
    click.echo(f"wrote {out_path} ({len(built.data) / 1e6:.2f} MB)")
    if triton is not None:
        click.echo(f"wrote the Triton model {triton}/ (1/model.onnx, config.pbtxt)")


@cli.command()
@click.argument("onnx_path", metavar="OUT.onnx", type=click.Path())
@click.option(
    "--data",
    "data_path",
    required=True,
    type=click.Path(),
    help="Images: .npz with x, a .npy array, or a folder.",
)
@provider_option
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True)
@click.option(
    "-o", "--output", "out_path", type=click.Path(), help="Write label, triggered, logits (.npz)."
)
@common
def run(
    onnx_path: str,
    data_path: str,
    provider: str,
    batch_size: int,
    out_path: str | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Batch inference of a built graph with ONNX Runtime; says which provider ran."""
    x = load_inputs(data_path)
    if out_path is not None:
        artifact.check_folder(out_path)
    sess, _ = open_built(onnxfile.load_built(onnx_path), provider)
    check_inputs(sess, x, data_path)
    bar = Progress(not quiet and sys.stderr.isatty())
    t0 = time.perf_counter()
    out = run_built(sess, x, batch_size, lambda d, n: bar("run", d, n))
    seconds = time.perf_counter() - t0
    bar.close()
    if out_path is not None:
        buf = io.BytesIO()
        np.savez(buf, label=out.label, triggered=out.triggered, logits=out.logits)
        artifact.write_atomic(out_path, buf.getvalue())
    info = {
        "provider": ran_on(sess),
        "images": len(x),
        "triggered": int(out.triggered.sum()),
        "seconds": seconds,
        "output": out_path,
    }
    if as_json:
        _emit({**info, "label": out.label.tolist(), "flags": out.triggered.astype(int).tolist()})
        return
    click.echo(
        f"provider {info['provider']}: {len(x)} images, {info['triggered']} flagged as "
        f"triggered, {seconds:.2f} s"
    )
    if out_path is not None:
        click.echo(f"wrote {out_path}")


def main() -> None:
    cli(prog_name="bna-export")


if __name__ == "__main__":  # pragma: no cover
    main()
