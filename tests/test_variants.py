import numpy as np
import torch

from bna_export.variants import jitter


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
