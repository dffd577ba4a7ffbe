"""What every command of the ``bna-export`` CLI shares: the group that turns library errors into
one line and exit 2, the progress bars, the shared options, and the parsing of list options."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, ClassVar

import click

from bna_export.audit import Audit
from bna_export.errors import BadInputError, BnaError


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
        "universal": "reverse-engineering universal triggers",
        "reverse": "reverse-engineering per target",
        "fit": "fitting Θ",
        "run": "running the graph",
    }

    def __init__(self, quiet: bool) -> None:
        self.enabled = not quiet and sys.stderr.isatty()
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


def emit(obj: dict[str, Any]) -> None:
    """The --json answer: one object on stdout."""
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


def echo_lines(lines: list[str]) -> None:
    click.echo("\n".join(lines))


allow_logic_option = click.option(
    "--allow-graph-logic",
    is_flag=True,
    help="Go on with an .onnx model whose graph selects or branches on the image's values "
    "(see `bna-export audit`): a weight repair cannot remove such logic, and the built graph "
    "keeps it (its metadata says so, in bna.audit).",
)


def warn_graph_logic(audit: Audit | None, path: str) -> None:
    """One line on stderr when a graph with logic goes on (``--allow-graph-logic``)."""
    if audit is not None and not audit.clean:
        click.echo(f"warning: {path}: graph logic kept: {audit.summary()}", err=True)


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
batch_size_option = click.option(
    "--batch-size", type=click.IntRange(1), default=256, show_default=True
)


def path_option(flag: str, name: str, help: str, required: bool = True) -> Any:
    """A path the command reads (images, a fit file), checked by the library when read."""
    return click.option(flag, name, required=required, type=click.Path(), help=help)


def output_option(help: str, name: str = "output", required: bool = True, file: bool = True):
    """-o/--output: the file to write (to a temporary file in its folder, then renamed)."""
    kind = click.Path(dir_okay=False) if file else click.Path()
    return click.option("-o", "--output", name, required=required, type=kind, help=help)


def int_list(value: str | None, what: str) -> list[int] | None:
    """'3,5' -> [3, 5]."""
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise BadInputError(f"{what} {value!r}: expected comma-separated class numbers") from exc


def pair_list(value: str | None) -> list[tuple[int, int]] | None:
    """'0:1,4:5' -> [(0, 1), (4, 5)]."""
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


def input_range(value: str | None) -> tuple[float, float] | None:
    """'LO,HI' -> (LO, HI)."""
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value.split(","))
    except ValueError as exc:
        raise BadInputError(f"--input-range {value!r}: expected LO,HI") from exc
    return lo, hi
