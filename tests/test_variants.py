from dataclasses import replace

import numpy as np
import torch

from bna_export.families import compactness
from bna_export.problems import Problem, TriggerEstimate
from bna_export.settings import FitSettings
from bna_export.variants import Variants, jitter


def test_jitter_shifts_within_bounds():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5)
    out = jitter(x, 1, np.random.default_rng(0))
    assert out.shape == x.shape
    assert torch.equal(jitter(x, 0, np.random.default_rng(0)), x)
    # every output row is some input row shifted by at most one pixel
    for n in range(2):
        diffs = [
            (out[n, 0] - torch.roll(x[n, 0], (dy, dx), (0, 1))).abs()[1:-1, 1:-1].max()
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        ]
        assert min(diffs) == 0


def test_stronger_blend_copies_stop_at_the_limit():
    # the fit's stronger copies of a blend stop at fit.blend_limit (never below the estimate)
    settings = FitSettings(trigger_scales=(1.0, 2.0, 3.0), blend_limit=0.3)
    shape = (1, 4, 4)

    def blend(alpha: float, target: int) -> TriggerEstimate:
        params = {"alpha": np.array([alpha], np.float32), "pattern": np.ones(shape, np.float32)}
        return TriggerEstimate(Problem("blend", target, (1,)), alpha, 1.0, 1, params, shape)

    ests = {0: [blend(0.05, 0)], 2: [blend(0.2, 2)], 3: [blend(0.5, 3)]}
    v = Variants([0, 2, 3], ests, settings, (0.0, 1.0))
    alpha = v.params["blend"]["alpha"][:, 0]
    got = [[round(float(alpha[v.rows[i]]), 4) for i in row] for row in v.triggered]
    assert got == [[0.05, 0.1, 0.15], [0.2, 0.3, 0.3], [0.5, 0.5, 0.5]]
    unlimited = Variants([2], {2: ests[2]}, replace(settings, blend_limit=1.0), (0.0, 1.0))
    alpha = unlimited.params["blend"]["alpha"][:, 0]
    assert [round(float(alpha[unlimited.rows[i]]), 4) for i in unlimited.triggered[0]] == [
        0.2,
        0.4,
        0.6,
    ]


def _patch(mask: np.ndarray, pattern: np.ndarray, target: int = 0) -> TriggerEstimate:
    shape = pattern.shape
    params = {"mask": mask[None].astype(np.float32), "pattern": pattern.astype(np.float32)}
    size = float(mask.sum())
    return TriggerEstimate(Problem("patch", target, (1,)), size, 1.0, 1, params, shape)


def test_stronger_copies_of_a_compact_patch_grow_and_spread_its_pattern():
    # a 2×2 block of a 9×9 image: its copy at scale 2 covers 4×4, at 3 6×6 (fit.patch_widen 1)
    mask, pattern = np.zeros((9, 9)), np.full((1, 9, 9), 0.3)
    mask[4:6, 4:6], pattern[0, 4:6, 4:6] = 1.0, [[0.2, 0.4], [0.6, 0.8]]
    v = Variants([0], {0: [_patch(mask, pattern)]}, FitSettings(patch_widen=1), (0.0, 1.0))
    masks = v.params["patch"]["mask"][:, 0]
    covered = [int((masks[v.rows[i]] > 0.5).sum()) for i in v.triggered[0]]
    assert covered == [4, 16, 36]
    grown = v.params["patch"]["pattern"][v.rows[v.triggered[0][1]], 0]
    assert torch.allclose(grown[4:6, 4:6], torch.tensor([[0.2, 0.4], [0.6, 0.8]]))
    # a new pixel takes the mean of the block's pixels within its reach, not the old pattern
    assert torch.isclose(grown[3, 3], torch.tensor(0.2)) and torch.isclose(
        grown[6, 6], torch.tensor(0.8)
    )
    assert torch.isclose(grown[3, 4], torch.tensor(0.3))  # mean of 0.2 and 0.4
    # the default 0.5: only the copy at scale 3 grows, by one pixel (4×4)
    half = Variants([0], {0: [_patch(mask, pattern)]}, FitSettings(patch_widen=0.5), (0.0, 1.0))
    masks = half.params["patch"]["mask"][:, 0]
    assert [int((masks[half.rows[i]] > 0.5).sum()) for i in half.triggered[0]] == [4, 4, 16]
    # off: the copies only strengthen the mask
    off = Variants([0], {0: [_patch(mask, pattern)]}, FitSettings(patch_widen=0), (0.0, 1.0))
    masks = off.params["patch"]["mask"][:, 0]
    assert [int((masks[off.rows[i]] > 0.5).sum()) for i in off.triggered[0]] == [4, 4, 4]


def test_a_scattered_patch_estimate_is_not_grown():
    # four pixels at the corners of a 9×9 image: no square of side 3 holds 40 % of them
    mask, pattern = np.zeros((9, 9)), np.full((1, 9, 9), 0.5)
    mask[[0, 0, 8, 8], [0, 8, 0, 8]] = 1.0
    assert compactness(torch.from_numpy(mask[None, None])) == 0.25
    v = Variants([0], {0: [_patch(mask, pattern)]}, FitSettings(patch_widen=1), (0.0, 1.0))
    masks = v.params["patch"]["mask"][:, 0]
    assert [int((masks[v.rows[i]] > 0.5).sum()) for i in v.triggered[0]] == [4, 4, 4]
    block = np.zeros((9, 9))
    block[2:5, 2:5] = 1.0
    assert compactness(torch.from_numpy(block[None, None])) == 1.0


def test_an_estimate_of_a_few_pixels_is_not_grown():
    # one bright pixel is compact, but fewer than fit.patch_grow_from pixels: a whole trigger
    mask, pattern = np.zeros((9, 9)), np.full((1, 9, 9), 0.5)
    mask[4, 4] = 1.0
    v = Variants([0], {0: [_patch(mask, pattern)]}, FitSettings(patch_widen=1), (0.0, 1.0))
    masks = v.params["patch"]["mask"][:, 0]
    assert [int((masks[v.rows[i]] > 0.5).sum()) for i in v.triggered[0]] == [1, 1, 1]
    low = FitSettings(patch_widen=1, patch_grow_from=1.0)
    v = Variants([0], {0: [_patch(mask, pattern)]}, low, (0.0, 1.0))
    masks = v.params["patch"]["mask"][:, 0]
    assert [int((masks[v.rows[i]] > 0.5).sum()) for i in v.triggered[0]] == [1, 9, 25]
