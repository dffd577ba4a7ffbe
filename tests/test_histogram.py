import math

import pytest
import torch

from bna_export.histogram import bin_layout, divergence, mass_left_out, normalise, soft_histogram
from bna_export.settings import HistogramSettings


def dense_reference(values, rows, lo, nbins, s: HistogramSettings):
    """Every bin of every sample, the slow obvious way (paper Eq. 6)."""
    width = int(nbins.max())
    out = torch.zeros(len(lo), width, dtype=values.dtype)
    for z, r in zip(values, rows, strict=True):
        m = int(nbins[r])
        for k in range(m):
            left = 1.0 if k == 0 else torch.sigmoid(s.tau * (z - (lo[r] + k * s.bin_width)))
            right = (
                0.0 if k == m - 1 else torch.sigmoid(s.tau * (z - (lo[r] + (k + 1) * s.bin_width)))
            )
            out[r, k] += left - right
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_windowed_equals_dense(dtype):
    g = torch.Generator().manual_seed(0)
    s = HistogramSettings()
    lo = torch.tensor([-1.0, 0.0, 2.0], dtype=dtype)
    hi = torch.tensor([1.0, 0.35, 2.05], dtype=dtype)
    nbins = bin_layout(lo, hi, s.bin_width)
    rows = torch.randint(0, 3, (300,), generator=g)
    # spread past both ends so the half-infinite bins matter
    values = (
        lo[rows] - 0.5 + (hi[rows] - lo[rows] + 1.0) * torch.rand(300, generator=g, dtype=dtype)
    )
    fast = soft_histogram(values, rows, lo, nbins, s)
    slow = dense_reference(values, rows, lo, nbins, s)
    assert fast.shape == slow.shape
    assert torch.allclose(fast, slow, atol=1e-5, rtol=0)
    # masses telescope to one per sample
    assert torch.allclose(fast.sum(1), torch.bincount(rows, minlength=3).to(dtype), atol=1e-4)


def test_chunking_does_not_change_the_result():
    g = torch.Generator().manual_seed(1)
    lo, nbins = torch.tensor([0.0]), torch.tensor([20])
    values = 2 * torch.rand(1000, generator=g)
    rows = torch.zeros(1000, dtype=torch.int64)
    a = soft_histogram(values, rows, lo, nbins, HistogramSettings())
    b = soft_histogram(values, rows, lo, nbins, HistogramSettings(chunk=7))
    assert torch.allclose(a, b, atol=1e-5)


def test_uniform_samples_fill_bins_equally():
    s = HistogramSettings()
    centres = torch.arange(10, dtype=torch.float64) * 0.1 + 0.05  # bin centres of [0, 1)
    values = centres.repeat(100)
    rows = torch.zeros_like(values, dtype=torch.int64)
    counts = soft_histogram(
        values, rows, torch.tensor([0.0], dtype=torch.float64), torch.tensor([10]), s
    )
    assert torch.allclose(counts[0], torch.full((10,), 100.0, dtype=torch.float64), atol=1e-3)


def test_gradcheck_float64():
    s = HistogramSettings()
    g = torch.Generator().manual_seed(2)
    values = (torch.rand(12, generator=g, dtype=torch.float64) * 0.5).requires_grad_(True)
    rows = torch.zeros(12, dtype=torch.int64)
    lo, nbins = torch.tensor([0.0], dtype=torch.float64), torch.tensor([5])
    assert torch.autograd.gradcheck(
        lambda v: soft_histogram(v, rows, lo, nbins, s), (values,), eps=1e-7, atol=1e-4
    )


def test_window_error_bound_is_tiny():
    assert mass_left_out(HistogramSettings()) < 1e-12


def test_divergences_known_answers():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    tv = divergence(p, q, "tv")
    assert tv.tolist() == pytest.approx([0.0, 1.0])
    js = divergence(p, q, "js", eps=0.0 + 1e-12)
    assert js[0].item() == pytest.approx(0.0, abs=1e-6)
    assert js[1].item() == pytest.approx(math.log(2), abs=1e-4)
    kl = divergence(torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]]), "kl", eps=0.0)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError):
        divergence(p, q, "hellinger")  # type: ignore[arg-type]


def test_normalise_uses_row_totals():
    counts = torch.tensor([[2.0, 2.0], [0.0, 0.0]])
    p = normalise(counts, torch.tensor([4, 0]))
    assert p.tolist() == [[0.5, 0.5], [0.0, 0.0]]
