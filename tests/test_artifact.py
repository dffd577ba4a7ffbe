import numpy as np
import pytest

from bna_export import artifact
from bna_export.errors import FitFileError


def sample() -> artifact.FitFile:
    return artifact.FitFile(
        {"targets": [3], "nested": {"b": 1, "a": [1.5, None]}},
        {
            "theta.0": np.arange(12, dtype=np.float32).reshape(1, 4, 3),
            "probe.label": np.array([1, 2, 3], dtype=np.int64),
            "probe.triggered": np.array([True, False]),
            "empty": np.zeros((0, 5), dtype=np.float32),
        },
    )


def test_round_trip(tmp_path):
    path = tmp_path / "f.bna"
    digest = artifact.save(path, sample())
    assert len(digest) == 64
    back = artifact.load(path)
    assert back.header["targets"] == [3]
    assert back.header["nested"] == {"b": 1, "a": [1.5, None]}
    for name, arr in sample().tensors.items():
        assert back.tensors[name].dtype == arr.dtype
        np.testing.assert_array_equal(back.tensors[name], arr)
    assert not [p for p in tmp_path.iterdir() if p.name != "f.bna"]  # no temporary left


def test_encoding_is_deterministic():
    assert artifact.encode(sample()) == artifact.encode(sample())


@pytest.mark.parametrize("cut", [0, 5, 15, 40, -1])
def test_truncated_file_is_refused(cut):
    buf = artifact.encode(sample())
    with pytest.raises(FitFileError):
        artifact.decode(buf[:cut] if cut >= 0 else buf[:-1])


def test_bad_magic_and_version():
    buf = bytearray(artifact.encode(sample()))
    with pytest.raises(FitFileError, match="magic"):
        artifact.decode(b"PK" + bytes(buf[2:]))
    text = bytes(buf).replace(b'"format_version":1', b'"format_version":9')
    with pytest.raises(FitFileError, match="version"):
        artifact.decode(text)


def test_overlapping_or_lying_ranges_are_refused():
    buf = artifact.encode(sample())
    # make two tensors claim the same bytes (JSON allows the padding space)
    bad = buf.replace(b'"offsets":[26,74]', b'"offsets":[0,48] ')
    assert bad != buf
    with pytest.raises(FitFileError, match="overlap"):
        artifact.decode(bad)
    wrong_shape = buf.replace(b'"shape":[1,4,3]', b'"shape":[1,4,4]')
    with pytest.raises(FitFileError, match="byte range"):
        artifact.decode(wrong_shape)


def test_missing_file_is_a_fit_file_error(tmp_path):
    with pytest.raises(FitFileError, match="no such file"):
        artifact.load(tmp_path / "missing.bna")


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_a_header_with_a_non_json_number_is_refused(constant):
    buf = artifact.encode(artifact.FitFile({"targets": [3], "threshold": 123456789}, {}))
    bad = buf.replace(b"123456789", constant.ljust(9))  # JSON allows the trailing spaces
    with pytest.raises(FitFileError, match="not valid JSON"):
        artifact.decode(bad)
