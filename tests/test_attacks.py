import numpy as np
import pytest

from bna_export.lab.attacks import ATTACKS, Trigger, all_to_all, all_to_one, poison, triggered_set


@pytest.mark.parametrize("kind", ATTACKS)
def test_trigger_changes_images_within_range_and_is_seeded(kind, rng):
    x = rng.random((6, 3, 16, 16)).astype(np.float32) * 0.8 + 0.1
    trig = Trigger(kind, (3, 16, 16), seed=4, delta=0.1)
    xt = trig.apply(x)
    assert xt.shape == x.shape and xt.dtype == np.float32
    assert xt.min() >= 0.0 and xt.max() <= 1.0
    assert np.abs(xt - x).max() > 1e-3
    np.testing.assert_array_equal(xt, Trigger(kind, (3, 16, 16), seed=4, delta=0.1).apply(x))
    np.testing.assert_array_equal(x, x.copy())  # input untouched


def test_patch_only_touches_its_square(rng):
    x = rng.random((2, 1, 12, 12)).astype(np.float32)
    trig = Trigger("patch", (1, 12, 12), size=3, seed=1)
    diff = np.abs(trig.apply(x) - x)[0, 0] > 0
    i, j = trig.location
    outside = diff.copy()
    outside[i : i + 3, j : j + 3] = False
    assert not outside.any()


def test_chessboard_is_additive_and_small(rng):
    x = np.full((1, 1, 8, 8), 0.5, dtype=np.float32)
    xt = Trigger("chessboard", (1, 8, 8), delta=2 / 255).apply(x)
    np.testing.assert_allclose(np.abs(xt - x), 2 / 255, atol=1e-6)
    assert xt[0, 0, 0, 0] != xt[0, 0, 0, 1]


def test_label_maps_and_poisoning():
    y = np.array([0, 1, 2, 3, 4])
    assert all_to_one(y, 2).tolist() == [2] * 5
    assert all_to_all(y, 5).tolist() == [1, 2, 3, 4, 0]
    x = np.zeros((5, 1, 8, 8), dtype=np.float32)
    trig = Trigger("patch", (1, 8, 8))
    xp, yp = poison(x, y, trig, all_to_one(y, 2), rate=1.0)
    assert len(xp) == 9 and (yp[5:] == 2).all()  # 4 eligible sources stamped and relabelled
    ts = triggered_set(x, y, trig, all_to_one(y, 2))
    assert ts["y"].tolist() == [0, 1, 3, 4] and (ts["attack_label"] == 2).all()


def test_unknown_trigger():
    with pytest.raises(ValueError):
        Trigger("sticker", (1, 8, 8))


def test_warp_noise_mode_adds_jittered_copies_at_their_own_labels(rng):
    x = rng.random((20, 1, 16, 16)).astype(np.float32)
    y = np.arange(20) % 4
    trig = Trigger("warp", (1, 16, 16), seed=3, cross=2.0)
    xp, yp = poison(x, y, trig, all_to_one(y, 0), rate=0.2, seed=1)
    n_poisoned = round(0.2 * 15)
    assert len(xp) == 20 + n_poisoned + 2 * n_poisoned
    assert (yp[20 : 20 + n_poisoned] == 0).all()
    crossed = xp[20 + n_poisoned :]
    # each cross copy is an original image at its own label, warped by more than the trigger
    matches = [int(np.argmin(np.abs(trig.apply(x) - c).reshape(20, -1).mean(1))) for c in crossed]
    assert yp[20 + n_poisoned :].tolist() == y[matches].tolist()
    assert not any(
        np.allclose(c, trig.apply(x[m : m + 1])[0]) for c, m in zip(crossed, matches, strict=True)
    )
    np.testing.assert_array_equal(trig.cross_copies(x[:3], seed=5), trig.cross_copies(x[:3], 5))
    assert not np.array_equal(trig.cross_copies(x[:3], seed=5), trig.cross_copies(x[:3], 6))
    assert trig.apply(x).tolist() == Trigger("warp", (1, 16, 16), seed=3).apply(x).tolist()
    with pytest.raises(ValueError):
        Trigger("blend", (1, 16, 16)).cross_copies(x)
