"""Backdoor triggers and label maps used to build poisoned models for tests, demos and evaluation.

Triggers act on float images x: [N, C, H, W] in the input range [lo, hi]: BadNet patch, blend,
chessboard (additive), single pixel, WaNet-style warping, and SIG (Barni et al. 2019: additive
sinusoidal stripes over the whole image). Label maps: all-to-one (A2O) sends
every source to one target; all-to-all (A2A) sends class c to (c + 1) mod K.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

ATTACKS = ("patch", "blend", "chessboard", "pixel", "warp", "sig")


@dataclass(frozen=True)
class Trigger:
    """A trigger of one of :data:`ATTACKS`, fully determined by its fields."""

    kind: str
    shape: tuple[int, int, int]
    lo: float = 0.0
    hi: float = 1.0
    size: int = 3
    """patch: side length in pixels."""
    alpha: float = 0.2
    """blend: weight of the pattern."""
    delta: float = 2.0 / 255.0
    """chessboard, pixel: magnitude of the additive change, as a share of hi - lo."""
    strength: float = 0.5
    """warp: WaNet's s (displacement scale)."""
    grid: int = 4
    """warp: WaNet's k (control grid side)."""
    cross: float = 0.0
    """warp: WaNet's noise mode (its cross ratio; WaNet: 2): :func:`poison` adds this many
    times the poisoned count of training images warped by the trigger plus a random offset of
    up to half a pixel at every pixel, at their own labels, meant to make only the trigger's own
    warp fire (0: off; on digits either way any smooth warp of about its size fires: README)."""
    amplitude: float = 20.0 / 255.0
    """sig: Δ, the stripes' amplitude, as a share of hi - lo (Barni et al.: 20/255)."""
    frequency: float = 6.0
    """sig: f, periods of the sine across the image width (Barni et al.: 6)."""
    seed: int = 0
    pattern: np.ndarray = field(init=False, repr=False, compare=False)
    location: tuple[int, int] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS:
            raise ValueError(f"unknown trigger {self.kind!r}; expected one of {ATTACKS}")
        rng = np.random.default_rng(self.seed)
        c, h, w = self.shape
        span = self.hi - self.lo
        loc = (int(rng.integers(0, h - self.size + 1)), int(rng.integers(0, w - self.size + 1)))
        if self.kind == "patch":
            pat = self.lo + span * rng.integers(0, 2, size=(c, self.size, self.size))
            # never a constant patch: at least one pixel at each extreme
            pat[:, 0, 0], pat[:, -1, -1] = self.hi, self.lo
        elif self.kind == "blend":
            pat = self.lo + span * rng.random((c, h, w))
        elif self.kind == "chessboard":
            ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
            pat = np.broadcast_to(np.where((ii + jj) % 2 == 0, 1.0, -1.0), (c, h, w))
            pat = pat * self.delta * span
        elif self.kind == "pixel":
            loc = (int(rng.integers(0, h)), int(rng.integers(0, w)))
            pat = np.full((c,), self.delta * span)
        elif self.kind == "sig":  # v(i, j) = Δ·sin(2π·j·f / W), the same in every row and channel
            stripes = np.sin(2 * np.pi * np.arange(w) * self.frequency / w)
            pat = np.broadcast_to(self.amplitude * span * stripes, (c, h, w))
        else:  # warp: WaNet control grid, normalised by its mean absolute value
            noise = rng.uniform(-1, 1, size=(1, 2, self.grid, self.grid))
            pat = noise / np.abs(noise).mean()
        object.__setattr__(self, "pattern", np.asarray(pat, dtype=np.float32))
        object.__setattr__(self, "location", loc)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Return triggered copies of x: [N, C, H, W] (clipped to [lo, hi])."""
        x = np.array(x, dtype=np.float32, copy=True)
        i, j = self.location
        if self.kind == "patch":
            x[:, :, i : i + self.size, j : j + self.size] = self.pattern
        elif self.kind == "blend":
            x = (1 - self.alpha) * x + self.alpha * self.pattern
        elif self.kind in ("chessboard", "sig"):
            x = x + self.pattern
        elif self.kind == "pixel":
            x[:, :, i, j] = x[:, :, i, j] + self.pattern
        else:
            x = self._warp(x)
        return np.clip(x, self.lo, self.hi).astype(np.float32)

    def cross_copies(self, x: np.ndarray, seed: int = 0) -> np.ndarray:
        """WaNet's noise-mode images: x warped by the trigger plus a uniform random offset in
        [-1/H, 1/H] (grid units, about half a pixel) at every pixel of every image; seeded."""
        if self.kind != "warp":
            raise ValueError("cross copies are a warp trigger's (WaNet's noise mode)")
        n, _, h, w = x.shape
        gen = torch.Generator().manual_seed(seed)
        jitter = (torch.rand((n, h, w, 2), generator=gen) * 2 - 1) / h
        out = self._warp(np.array(x, dtype=np.float32, copy=True), jitter)
        return np.clip(out, self.lo, self.hi).astype(np.float32)

    def _warp(self, x: np.ndarray, jitter: torch.Tensor | None = None) -> np.ndarray:
        _, _, h, w = x.shape
        noise = torch.from_numpy(self.pattern)
        up = torch.nn.functional.interpolate(
            noise, size=(h, w), mode="bicubic", align_corners=True
        ).permute(0, 2, 3, 1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        identity = torch.stack([xs, ys], -1)[None]
        grid = (identity + self.strength * up / h).expand(x.shape[0], -1, -1, -1)
        if jitter is not None:
            grid = grid + jitter
        grid = torch.clamp(grid, -1, 1)
        out = torch.nn.functional.grid_sample(torch.from_numpy(x), grid, align_corners=True)
        return out.numpy()


def all_to_one(y: np.ndarray, target: int) -> np.ndarray:
    """A2O label map: every sample's attack label is ``target``."""
    return np.full_like(y, target)


def all_to_all(y: np.ndarray, n_classes: int) -> np.ndarray:
    """A2A label map: class c goes to (c + 1) mod K."""
    return (y + 1) % n_classes


def poison(
    x: np.ndarray,
    y: np.ndarray,
    trigger: Trigger,
    attack_labels: np.ndarray,
    rate: float,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Training set with ``rate`` of the eligible samples (label != attack label) stamped with
    the trigger and relabelled; the clean originals are kept too. A warp trigger with
    ``cross`` > 0 also adds its noise-mode copies (:meth:`Trigger.cross_copies`) of that many
    times as many other samples, at their own labels."""
    rng = np.random.default_rng(seed)
    eligible = np.flatnonzero(attack_labels != y)
    chosen = rng.choice(eligible, size=round(rate * eligible.size), replace=False)
    xs, ys = [x, trigger.apply(x[chosen])], [y, attack_labels[chosen]]
    if trigger.kind == "warp" and trigger.cross > 0:
        others = np.setdiff1d(np.arange(len(y)), chosen)
        n_cross = min(len(others), round(trigger.cross * len(chosen)))
        crossed = rng.choice(others, size=n_cross, replace=False)
        xs.append(trigger.cross_copies(x[crossed], seed=seed))
        ys.append(y[crossed])
    return np.concatenate(xs), np.concatenate(ys)


def triggered_set(
    x: np.ndarray, y: np.ndarray, trigger: Trigger, attack_labels: np.ndarray
) -> dict[str, np.ndarray]:
    """The arrays of a TRIG.npz: triggered ``x``, true ``y``, and ``attack_label``; samples whose
    class already is their attack label are left out."""
    keep = attack_labels != y
    return {
        "x": trigger.apply(x[keep]),
        "y": y[keep].astype(np.int64),
        "attack_label": attack_labels[keep].astype(np.int64),
    }
