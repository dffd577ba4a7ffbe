"""A batch of reverse-engineering problems as tensors: what a problem and its answer (a
:class:`TriggerEstimate`) are, which images each sees at each step (:class:`Pools`), every
problem's trigger parameters kept per family (:class:`Triggers`), its goal (reach t, leave s,
or leave each image's own class) and its success on its whole pool (:func:`success`); mixed
precision for f's passes where the hardware has native bfloat16."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .data import Dataset
from .families import FAMILIES, Family, Trigger
from .settings import ReverseSettings

ANY = -1
"""The target of an untargeted problem: any class but its (single) source."""
OWN = -2
"""The target of a universal untargeted problem: every image must leave its own class (the
all-to-all map, :mod:`bna_export.universal`)."""
Forward = Callable[[Tensor, Tensor], Tensor]
"""forward(x, problem): logits of images x [N, C, H, W], each belonging to problem [N] (its
index in the list solved)."""

TOLERANCE = 1e-9
"""Success rates are ratios of counts: 19/20 reaches 0.95."""


@dataclass(frozen=True)
class Problem:
    """One reverse-engineering problem: reach ``target`` from the images of ``sources``."""

    family: str
    target: int
    sources: tuple[int, ...]
    restart: int = 0

    def seed(self, seed: int) -> int:
        """The problem's own random seed: a hash of the run's seed and the problem."""
        key = f"{seed}:{self.family}:{self.target}:{self.sources}:{self.restart}"
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


@dataclass
class TriggerEstimate:
    """A reverse-engineered trigger: its family's tensors ``params`` (see
    :mod:`bna_export.families`; e.g. patch: ``mask`` [1, H, W] and ``pattern`` [C, H, W]) for
    images of ``shape`` (C, H, W)."""

    problem: Problem
    size: float
    success: float
    steps: int
    params: dict[str, np.ndarray]
    shape: tuple[int, int, int]

    @property
    def family(self) -> str:
        return self.problem.family

    @property
    def kind(self) -> Family:
        return FAMILIES[self.problem.family]

    @property
    def mask(self) -> np.ndarray | None:
        """A patch's mask [H, W] (None for other families)."""
        m = self.params.get("mask")
        return None if m is None else m[0]

    @property
    def pattern(self) -> np.ndarray:
        """The pattern [C, H, W] of a patch or blend, the additive v of a perturbation."""
        return self.params["pattern"]

    def tensors(self, device: torch.device | str = "cpu") -> Trigger:
        """The trigger as tensors with a leading problem dimension of 1."""
        return {k: torch.as_tensor(v, device=device)[None] for k, v in self.params.items()}

    def apply(self, x: Tensor, lo: float, hi: float, scale: float = 1.0) -> Tensor:
        """Embed the trigger in x: [N, C, H, W]; ``scale`` strengthens (> 1) or weakens it
        (the family's :meth:`~bna_export.families.Family.scaled`)."""
        trig = {k: v.to(x.dtype) for k, v in self.tensors(x.device).items()}
        if scale != 1.0:
            trig = self.kind.scaled(trig, scale)
        return self.kind.embed(trig, x[None], lo, hi)[0]


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 convolutions natively (a CUDA GPU with bf16, or a
    CPU with AVX512-BF16 / AMX that oneDNN uses); elsewhere bf16 is emulated and slow."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[None]:
    """Mixed precision for f's forward passes: bfloat16 where asked ('bfloat16', or 'auto' on
    hardware with native bf16), else plain float32."""
    on = precision == "bfloat16" or (precision == "auto" and bf16_native(device))
    if not on:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def goal(
    logits: Tensor, target: Tensor, away: Tensor, confidence: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Per sample, the loss and whether f's answer meets the goal: reach ``target`` (with at
    least ``confidence`` of f's probability), or, where ``away`` ≥ 0 (an untargeted problem),
    leave class ``away``: −log(1 − p_away)."""
    hit = logits.argmax(1) == target
    if confidence > 0:
        p_t = logits.softmax(1).gather(1, target.clamp_min(0)[:, None])[:, 0]
        hit = hit & (p_t >= confidence)
    loss = torch.nn.functional.cross_entropy(logits, target.clamp_min(0), reduction="none")
    untargeted = away >= 0
    if bool(untargeted.any()):
        rest = logits.scatter(1, away.clamp_min(0)[:, None], float("-inf")).logsumexp(1)
        leave = logits.logsumexp(1) - rest  # −log Σ_{c ≠ away} p_c
        loss = torch.where(untargeted, leave, loss)
        hit = torch.where(untargeted, logits.argmax(1) != away, hit)
    return loss, hit


def away_of(away: Tensor, index: Tensor, labels: Tensor) -> Tensor:
    """Per image of ``index`` ((p, n) image indices of p problems), flattened: the class it
    must leave, its problem's ``away`` ((p,); -1: a targeted problem) or, where that is
    :data:`OWN`, the image's own label (``labels`` of every image)."""
    a = away[:, None].expand(index.shape)
    return torch.where(a == OWN, labels[index], a).flatten()


class Pools:
    """Which images each problem sees at each step.

    A problem whose pool fits in the batch sees its whole pool every step (weights mark the
    padding); a larger pool is sampled without replacement from the problem's own schedule,
    drawn once at set-up from the problem's generator. Indices: (P, B) per step.
    """

    def __init__(
        self,
        data: Dataset,
        problems: Sequence[Problem],
        batch_size: int,
        steps: int,
        gens: Sequence[torch.Generator],
    ) -> None:
        pools = [torch.from_numpy(data.of_classes(list(p.sources))) for p in problems]
        empty = next((p for p, pool in zip(problems, pools, strict=True) if not len(pool)), None)
        if empty is not None:
            raise ValueError(f"no clean images of source classes {empty.sources}")
        self.length = torch.tensor([len(pool) for pool in pools])  # (P,)
        self.width = int(self.length.max())
        self.batch = min(batch_size, self.width)
        self.matrix = torch.zeros((len(pools), self.width), dtype=torch.int64)  # (P, L)
        for i, pool in enumerate(pools):  # once, at set-up
            self.matrix[i, : len(pool)] = pool
        self.drawn = self.length > self.batch  # (P,) problems that sample their pool
        self.row = torch.cumsum(self.drawn.long(), 0) - 1  # row in the schedule
        self.schedule = (
            torch.stack(  # (P_drawn, steps, B) positions in the pool
                [
                    torch.rand((steps, int(self.length[i])), generator=gens[i]).argsort(1)[
                        :, : self.batch
                    ]
                    for i in torch.nonzero(self.drawn).flatten().tolist()
                ]
            )
            if bool(self.drawn.any())
            else torch.zeros((0, steps, self.batch), dtype=torch.int64)
        )

    def step(self, chunk: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """Image indices (p, B) and weights (p, B) of the problems ``chunk`` at ``step``."""
        pos = torch.arange(self.batch).expand(len(chunk), -1).clone()
        drawn = self.drawn[chunk]
        if bool(drawn.any()):
            pos[drawn] = self.schedule[self.row[chunk[drawn]], step]
        weight = (pos < self.length[chunk, None]).float()
        return self.matrix[chunk].gather(1, pos), weight

    def full(self, chunk: Tensor) -> tuple[Tensor, Tensor]:
        """Every image of each problem's pool (p, L) with weights (p, L)."""
        pos = torch.arange(self.width)
        return self.matrix[chunk], (pos[None, :] < self.length[chunk, None]).float()


class Triggers:
    """Every problem's raw parameters, kept per family (a family's problems are the rows of
    its tensors); ``row[i]`` is problem i's row in its family's tensors."""

    def __init__(self, problems: Sequence[Problem], raw: Sequence[Trigger], dev: torch.device):
        self.names = list(dict.fromkeys(p.family for p in problems))
        self.family = torch.tensor([self.names.index(p.family) for p in problems])
        self.row = torch.zeros(len(problems), dtype=torch.int64)
        self.raw: dict[str, Trigger] = {}
        for fi, name in enumerate(self.names):
            members = torch.nonzero(self.family == fi).flatten()
            self.row[members] = torch.arange(len(members))
            keys = FAMILIES[name].keys
            self.raw[name] = {
                k: torch.stack([raw[i][k] for i in members.tolist()]).to(dev) for k in keys
            }

    def of(self, name: str, among: Tensor) -> Tensor:
        """The problems of ``among`` that belong to family ``name``."""
        return among[self.family[among] == self.names.index(name)]

    def clone(self) -> dict[str, Trigger]:
        return {f: {k: t.clone() for k, t in r.items()} for f, r in self.raw.items()}


def sizes(raw: dict[str, Trigger], tr: Triggers, lo: float, hi: float, n: int) -> Tensor:
    """Every problem's trigger size from raw parameters ``raw`` (one dict per family): (n,)."""
    out = torch.zeros(n, dtype=torch.float64)
    everyone = torch.arange(n)
    with torch.no_grad():
        for name in tr.names:
            mine = tr.of(name, everyone)
            fam = FAMILIES[name]
            out[mine] = fam.size(fam.decode(raw[name], lo, hi)).double().cpu()
    return out


def success(
    run: Forward,
    x_all: Tensor,
    pools: Pools,
    which: Tensor,
    tr: Triggers,
    raw: dict[str, Trigger],
    goals: tuple[Tensor, Tensor, Tensor],
    input_range: tuple[float, float],
    settings: ReverseSettings,
) -> Tensor:
    """Share of the whole pool that each problem in ``which`` moves to its goal (``goals``:
    every problem's target and away class, see :func:`goal`, and every image's label, see
    :func:`away_of`) with its trigger (``raw``: every problem's raw parameters, per family):
    (len(which),) float64, on the CPU."""
    out = torch.zeros(len(which), dtype=torch.float64)  # 19/20 must compare >= 0.95
    per_forward = max(1, settings.images_per_forward // pools.width)
    dev = x_all.device
    lo, hi = input_range
    targets, away, labels = goals
    position = torch.arange(len(which))
    with torch.no_grad():
        for name in tr.names:
            fam = FAMILIES[name]
            in_family = position[tr.family[which] == tr.names.index(name)]
            for rows in torch.split(in_family, per_forward) if in_family.numel() else ():
                chunk = which[rows]
                index, weight = pools.full(chunk)
                r = tr.row[chunk].to(dev)
                trig = fam.decode({k: t[r] for k, t in raw[name].items()}, lo, hi)
                xt = fam.embed(trig, x_all[index.to(dev)], lo, hi)
                n = index.shape[1]
                with autocast(dev, settings.precision):
                    logits = run(xt.flatten(0, 1), chunk.repeat_interleave(n).to(dev)).float()
                _, hit = goal(
                    logits,
                    targets[chunk].repeat_interleave(n).to(dev),
                    away_of(away[chunk], index, labels).to(dev),
                    settings.confidence,
                )
                weight = weight.double().to(dev)
                hit = hit.double().view(len(chunk), -1)
                out[rows] = ((hit * weight).sum(1) / weight.sum(1)).cpu()
    return out
