"""The commands a deploy pipeline runs before it ships: ``audit`` (graph logic a weight repair
cannot remove) and ``verify`` (a built graph is what its model and fit file build)."""

from __future__ import annotations

import click

from bna_export import report
from bna_export.audit import audit_file
from bna_export.export import verify_built

from .options import allow_logic_option, common, echo_lines, emit, path_option


@click.command()
@click.argument("onnx_path", metavar="MODEL.onnx", type=click.Path())
@common
def audit(onnx_path: str, as_json: bool, quiet: bool) -> None:
    """List what in MODEL.onnx's graph selects or branches on the image's values: If, Loop,
    Where, comparisons, ArgMax/TopK feeding anything but an output, NonZero, indexing with
    computed indices, the constants compared against, and outputs not computed from the
    image. A backdoor written into the graph hides there; no weight repair removes it.

    Exit 0 when nothing is found, 1 when something is, 2 when MODEL.onnx cannot be read.
    """
    found = audit_file(onnx_path)
    if as_json:
        emit({"model": onnx_path, **found.to_json()})
    else:
        echo_lines(report.audit_lines(found, onnx_path))
    if not found.clean:
        click.get_current_context().exit(1)


@click.command()
@click.argument("built_path", metavar="REPAIRED.onnx", type=click.Path())
@path_option("--model", "model_path", "The .onnx that was given to `build`.")
@path_option("--fit", "fit_path", "The fit file that was given to `build`.")
@allow_logic_option
@common
def verify(
    built_path: str,
    model_path: str,
    fit_path: str,
    allow_graph_logic: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Rebuild REPAIRED.onnx from --model and --fit and check that it is the same bytes (a
    build is deterministic): what a deploy pipeline runs before it ships the repaired graph.

    Exit 0 when identical; 1 when not, or when it cannot be rebuilt from these inputs (the line
    says why: another model or fit file, by their SHA-256 in the graph's metadata, or other
    bytes); 2 when REPAIRED.onnx cannot be read.
    """
    got = verify_built(built_path, model_path, fit_path, allow_graph_logic)
    if as_json:
        emit({"built": built_path, "identical": got.identical, "reason": got.reason,
              "built_sha256": got.built_sha256, "rebuilt_sha256": got.rebuilt_sha256})  # fmt: skip
    else:
        verdict = "verified" if got.identical else "NOT verified"
        click.echo(f"{verdict}: {built_path}: {got.reason}")
    if not got.identical:
        click.get_current_context().exit(1)
