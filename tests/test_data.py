import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from bna_export.data import load_data, load_inputs, load_npz
from bna_export.errors import BadInputError


def test_npz_uint8_is_scaled(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x=np.full((3, 1, 4, 4), 255, dtype=np.uint8), y=np.array([0, 1, 2]))
    d = load_data(p)
    assert d.x.dtype == np.float32 and d.x.max() == 1.0 and d.y.dtype == np.int64


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((2, 1, 4, 4), np.float32)}, "missing array"),
        ({"x": np.zeros((2, 4), np.float32), "y": np.zeros(2, np.int64)}, "expected N×C×H×W"),
        ({"x": np.full((2, 1, 4, 4), np.nan, np.float32), "y": np.zeros(2, np.int64)}, "NaN"),
        ({"x": np.zeros((2, 1, 4, 4), np.float32), "y": np.zeros(3, np.int64)}, "2 images but 3"),
        ({"x": np.zeros((0, 1, 4, 4), np.float32), "y": np.zeros(0, np.int64)}, "empty"),
        ({"x": np.zeros((2, 1, 4, 4), np.float32), "y": np.array([0.5, 1.0])}, "integers"),
        ({"x": np.zeros((2, 1, 4, 4), np.float32), "y": np.array([0, -1])}, "negative"),
    ],
)
def test_bad_npz(tmp_path, arrays, message):
    p = tmp_path / "d.npz"
    np.savez(p, **arrays)
    with pytest.raises(BadInputError, match=message):
        load_data(p)


def test_pickled_npz_is_refused(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x=np.array([object()], dtype=object), y=np.zeros(1, np.int64))
    with pytest.raises(BadInputError):
        load_npz(p)


@pytest.mark.parametrize("member", ["y", "attack_label"])
def test_npz_member_that_is_not_an_array_is_refused(tmp_path, member):
    # numpy hands back the raw bytes of a member without the .npy magic (found by the fuzzer)
    p = tmp_path / "d.npz"
    arrays = {"x": np.zeros((2, 1, 4, 4), np.float32), "y": np.zeros(2, np.int64)}
    arrays["attack_label"] = np.zeros(2, np.int64)
    with zipfile.ZipFile(p, "w") as z:
        for k, v in arrays.items():
            buf = io.BytesIO()
            np.save(buf, v)
            z.writestr(k + ".npy", b"not an array" if k == member else buf.getvalue())
    with pytest.raises(BadInputError, match=f"{member} is not a .npy array"):
        load_npz(p, extra=("attack_label",))


def test_image_folder(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.fromarray(np.full((6, 5, 3), 40 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    d = load_data(tmp_path)
    assert d.x.shape == (4, 3, 6, 5) and d.y.tolist() == [0, 0, 1, 1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="no images"):
        load_data(tmp_path)


def test_npy_inputs(tmp_path):
    """`run` and `bna_run` read the same .npy: uint8 scaled, N×H×W gets one channel."""
    p = tmp_path / "x.npy"
    np.save(p, np.full((3, 4, 4), 255, dtype=np.uint8))
    x = load_inputs(p)
    assert x.shape == (3, 1, 4, 4) and x.dtype == np.float32 and x.max() == 1.0
    np.save(p, np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(BadInputError, match=r"not a readable \.npy"):
        load_inputs(p)
    p.write_bytes(p.read_bytes()[:20])
    with pytest.raises(BadInputError, match=r"not a readable \.npy"):
        load_inputs(p)
    with pytest.raises(BadInputError, match="no such file"):
        load_inputs(tmp_path / "missing.npy")
