"""Loading labelled image sets (``.npz`` or a folder with one sub-folder per class) and the
per-class selections that fitting and evaluation need."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadInputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class Dataset:
    """Images x: [N, C, H, W] float32 in the model's input range; labels y: [N] int64."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def of_classes(self, classes: list[int] | np.ndarray) -> np.ndarray:
        """Indices of the samples whose label is in ``classes``."""
        return np.flatnonzero(np.isin(self.y, np.asarray(classes, dtype=np.int64)))


def class_rank(y: np.ndarray) -> np.ndarray:
    """Each label's rank among the equal labels before it: [3, 5, 3] -> [0, 0, 1]."""
    order = np.argsort(y, kind="stable")
    ranked = y[order]
    rank = np.empty(len(y), dtype=np.int64)
    rank[order] = np.arange(len(y)) - np.searchsorted(ranked, ranked, side="left")
    return rank


def _as_images(x: np.ndarray, source: str) -> np.ndarray:
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    else:
        raise BadInputError(f"{source}: x has dtype {x.dtype}; expected float32 or uint8")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise BadInputError(f"{source}: x has shape {x.shape}; expected N×C×H×W")
    if x.shape[0] == 0:
        raise BadInputError(f"{source}: the data set is empty")
    if min(x.shape[1:]) == 0:
        raise BadInputError(f"{source}: x has shape {x.shape}; images cannot be empty")
    if not np.isfinite(x).all():
        raise BadInputError(f"{source}: x holds NaN or Inf values")
    return np.ascontiguousarray(x)


def _as_labels(y: np.ndarray, n: int, source: str) -> np.ndarray:
    if not np.issubdtype(y.dtype, np.integer):
        raise BadInputError(f"{source}: y has dtype {y.dtype}; expected integers")
    y = y.reshape(-1).astype(np.int64)
    if y.shape[0] != n:
        raise BadInputError(f"{source}: {n} images but {y.shape[0]} labels")
    if (y < 0).any():
        raise BadInputError(f"{source}: negative labels")
    return y


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def read_arrays(path: str | Path, keys: tuple[str, ...], optional: tuple[str, ...] = ()):
    """The arrays ``keys`` (and those of ``optional`` that exist) of an ``.npz``, or the one
    array of a ``.npy`` (keys ``("x",)``), without pickle. Whatever the bytes, the only error
    is :class:`BadInputError`: the file is untrusted input."""
    source = str(path)
    kind = ".npy" if source.endswith(".npy") else ".npz"
    try:
        loaded = np.load(path, allow_pickle=False)
        if kind == ".npy":
            if not isinstance(loaded, np.ndarray):
                loaded.close()
                raise BadInputError(f"{source}: not a .npy array")
            return {"x": loaded}
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise BadInputError(f"{source}: one array, not an .npz archive of named arrays")
        with loaded as f:
            missing = [k for k in keys if k not in f.files]
            if missing:
                raise BadInputError(
                    f"{source}: missing array(s) {', '.join(missing)}; "
                    f"found {', '.join(f.files[:10]) or 'none'}"
                )
            arrays = {k: f[k] for k in (*keys, *optional) if k in f.files}
        for k, v in arrays.items():
            if not isinstance(v, np.ndarray):  # a member that is not a .npy comes as bytes
                raise BadInputError(f"{source}: {k} is not a .npy array")
        return arrays
    except BadInputError:
        raise
    except FileNotFoundError as exc:
        raise BadInputError(f"{source}: no such file") from exc
    except (IsADirectoryError, PermissionError) as exc:
        raise BadInputError(f"{source}: cannot read ({exc.strerror})") from exc
    except Exception as exc:  # numpy/zipfile raise many types on malformed bytes
        raise BadInputError(f"{source}: not a readable {kind} file ({_first_line(exc)})") from exc


def load_npz(path: str | Path, *, extra: tuple[str, ...] = ()) -> tuple[Dataset, dict]:
    """Read ``x`` and ``y`` (and the named ``extra`` arrays) from an ``.npz`` without pickle."""
    source = str(path)
    arrays = read_arrays(path, ("x", "y", *extra))
    x, y = arrays["x"], arrays["y"]
    more = {k: arrays[k] for k in extra}
    xs = _as_images(x, source)
    ys = _as_labels(y, xs.shape[0], source)
    for k, v in more.items():
        more[k] = _as_labels(v, xs.shape[0], f"{source}[{k}]")
    return Dataset(xs, ys), more


def load_inputs(path: str | Path) -> np.ndarray:
    """Images only (labels optional): ``x`` of an ``.npz``, a ``.npy`` array, or an image
    folder's images."""
    if Path(path).is_dir():
        return load_folder(path).x
    return _as_images(read_arrays(path, ("x",))["x"], str(path))


def load_folder(path: str | Path) -> Dataset:
    """Read a folder with one sub-folder per class (sorted names are classes 0, 1, ...)."""
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - pillow is a dependency
        raise BadInputError("reading image folders needs pillow (pip install pillow)") from exc
    root = Path(path)
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    if not classes:
        raise BadInputError(f"{root}: no class sub-folders")
    images, labels = [], []
    for label, folder in enumerate(classes):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise BadInputError(f"{folder}: class {label} has no images")
        for file in files:
            try:
                with Image.open(file) as im:
                    arr = np.asarray(im)
            except Exception as exc:
                raise BadInputError(f"{file}: not a readable image ({exc})") from exc
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            images.append(arr)
            labels.append(label)
    shapes = {a.shape for a in images}
    if len(shapes) != 1:
        raise BadInputError(f"{root}: images of different shapes {sorted(shapes)[:3]}")
    x = np.stack(images)
    return Dataset(_as_images(x, str(root)), np.asarray(labels, dtype=np.int64))


def load_data(path: str | Path) -> Dataset:
    """Load a labelled set from an ``.npz`` file or an image folder."""
    p = Path(path)
    if p.is_dir():
        return load_folder(p)
    if not p.exists():
        raise BadInputError(f"{p}: no such file or folder")
    return load_npz(p)[0]


def check_against_model(
    data: Dataset, input_shape: tuple[int, ...], n_classes: int, source: str
) -> None:
    """Fail when images or labels do not fit a model of ``input_shape`` (C, H, W), K classes."""
    if tuple(data.x.shape[1:]) != tuple(input_shape):
        raise BadInputError(
            f"{source}: images are {tuple(data.x.shape[1:])} but the model takes "
            f"{tuple(input_shape)}"
        )
    if data.y.max() >= n_classes:
        raise BadInputError(
            f"{source}: label {int(data.y.max())} but the model has only {n_classes} classes"
        )
