"""Reverse-engineering sharded over processes (``torchrun``): each rank solves every
``world``-th problem and the estimates are exchanged, so that every rank ends with all of them.

Problems are independent and seeded by themselves (see :mod:`bna_export.reverse`), so a sharded
run gives the estimates of a single-process run (bit for bit when both use the same number of
threads per process; ``torchrun`` sets ``OMP_NUM_THREADS=1`` for several ranks). The exchange is
one ``all_reduce`` of plain tensors (each rank fills its own rows, zeros elsewhere): no pickling.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .data import Dataset
from .errors import BadInputError
from .families import FAMILIES
from .norm import BnaModel
from .reverse import Problem, Progress, TriggerEstimate, reverse_engineer
from .settings import ReverseSettings


@dataclass(frozen=True)
class Shard:
    """This process's place among ``world`` processes; rank 0 writes the results."""

    rank: int = 0
    world: int = 1

    @property
    def primary(self) -> bool:
        return self.rank == 0

    def mine(self, n: int) -> list[int]:
        """Indices of the problems this rank solves (interleaved, so that each rank gets a
        like mix of families and targets)."""
        return list(range(self.rank, n, self.world))


def resolve_device(spec: str = "auto") -> torch.device:
    """The device ``fit --device`` names: ``cpu``, ``cuda`` (this process's GPU: under
    ``torchrun`` the one numbered by LOCAL_RANK, so one rank per GPU) or ``auto`` (CUDA when
    PyTorch sees a GPU). ``cuda`` without one is a :class:`BadInputError`."""
    if spec not in ("auto", "cpu", "cuda"):
        raise BadInputError(f"--device {spec!r}: expected auto, cpu or cuda")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise BadInputError(
            "--device cuda: this PyTorch sees no CUDA GPU (a CPU build, or no driver); "
            "use --device cpu or auto"
        )
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise BadInputError(
            f"--device cuda: rank {local} needs GPU {local} but "
            f"{torch.cuda.device_count()} are visible; start one rank per GPU"
        )
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def start(device: torch.device | str = "cpu") -> Shard:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1): gloo on CPU,
    nccl on CUDA. A plain launch is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Shard()
    if not dist.is_available():
        raise BadInputError("this PyTorch build has no torch.distributed; run without torchrun")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if str(device).startswith("cuda") else "gloo")
    return Shard(dist.get_rank(), dist.get_world_size())


def stop(shard: Shard) -> None:
    """Leave the process group (no-op for a single process)."""
    if shard.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def solve(
    model: BnaModel,
    data: Dataset,
    problems: Sequence[Problem],
    input_range: tuple[float, float],
    settings: ReverseSettings,
    seed: int,
    shard: Shard = Shard(),
    progress: Progress | None = None,
    start: Sequence[TriggerEstimate] | None = None,
) -> list[TriggerEstimate]:
    """:func:`reverse_engineer` on this rank's share of ``problems``; every rank returns the
    estimates of all problems, in order. ``progress`` sees this rank's problem-steps and a
    finished mask over all problems (other ranks' problems count as finished); ``start``: per
    problem an estimate to start from."""
    if shard.world <= 1:
        return reverse_engineer(
            model, data, problems, input_range, settings, seed, progress, start=start
        )
    mine = shard.mine(len(problems))
    report = None
    if progress is not None:
        index = torch.tensor(mine, dtype=torch.int64)

        def report(done: int, total: int, finished: torch.Tensor) -> None:
            every = torch.ones(len(problems), dtype=torch.bool)  # others' count as finished
            every[index] = finished
            progress(done, total, every)

    mine_start = None if start is None else [start[i] for i in mine]
    local = reverse_engineer(
        model, data, [problems[i] for i in mine], input_range, settings, seed, report,
        start=mine_start,
    )  # fmt: skip
    n = len(problems)
    numbers = torch.zeros((n, 3), dtype=torch.float64)  # size, success, steps
    shape = tuple(int(d) for d in data.x.shape[1:])
    # one zero-filled tensor per family and trigger tensor, a row per problem of that family,
    # each rank filling its own rows
    rows: dict[str, list[int]] = {}
    for i, p in enumerate(problems):
        rows.setdefault(p.family, []).append(i)
    row = {i: j for members in rows.values() for j, i in enumerate(members)}
    parts = {
        (name, k): torch.zeros((len(members), *v.shape))
        for name, members in rows.items()
        for k, v in FAMILIES[name].start(torch.Generator(), shape, 1.0, 0.0).items()
    }
    for i, est in zip(mine, local, strict=True):
        numbers[i] = torch.tensor([est.size, est.success, est.steps], dtype=torch.float64)
        for k, v in est.params.items():
            parts[(est.family, k)][row[i]] = torch.from_numpy(v)
    dev = model.device  # nccl reduces tensors on the GPU, gloo on the CPU
    flat = [numbers.to(dev)] + [parts[key].to(dev) for key in sorted(parts)]
    for t in flat:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    numbers = flat[0].cpu()
    parts = {key: t.cpu() for key, t in zip(sorted(parts), flat[1:], strict=True)}
    return [
        TriggerEstimate(
            problem=p,
            size=float(numbers[i, 0]),
            success=float(numbers[i, 1]),
            steps=int(numbers[i, 2]),
            params={
                k: np.ascontiguousarray(parts[(p.family, k)][row[i]].numpy())
                for k in FAMILIES[p.family].keys
            },
            shape=shape,
        )
        for i, p in enumerate(problems)
    ]
