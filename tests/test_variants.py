from dataclasses import replace

import numpy as np
import torch

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
