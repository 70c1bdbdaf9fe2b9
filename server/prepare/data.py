"""Data for preparation: scikit-learn's bundled digits (nothing is downloaded), ``.npz`` arrays,
or a callable returning torch datasets, all turned into in-memory train/val/test splits.


1,797 grey 8x8 images with values 0..16, ten classes. :func:`load_digits_splits` returns a
stratified train/validation/test split with a fixed seed, normalised as the models expect:
``x = (raw / 16 - mean) / std`` with ``mean`` and ``std`` taken over the training split,
shape ``(N, 1, 8, 8)``, ``float32``; labels are ``int64``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The split does not follow the training seed, so every run is scored on the same test set.
SPLIT_SEED = 0
PIXEL_MAX = 16.0
INPUT_SHAPE = (1, 8, 8)
NUM_CLASSES = 10


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # (N, 1, 8, 8) float32, normalised
    y: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Normalization:
    """``x = (raw / divide - mean) / std``; what a caller with raw pixels must apply."""

    divide: float
    mean: float
    std: float

    def apply(self, raw: np.ndarray) -> np.ndarray:
        return ((np.asarray(raw, np.float32) / self.divide - self.mean) / self.std).astype(
            np.float32
        )

    def to_dict(self) -> dict[str, float]:
        return {"divide": self.divide, "mean": self.mean, "std": self.std}


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    normalization: Normalization | None
    split_seed: int | None
    input_shape: tuple[int, ...] = INPUT_SHAPE
    num_classes: int = NUM_CLASSES

    def describe(self) -> dict:
        return {
            "name": self.name,
            "split_seed": self.split_seed,
            "train": len(self.train),
            "val": len(self.val),
            "test": len(self.test),
            "normalization": self.normalization.to_dict() if self.normalization else None,
        }

    @property
    def eval_split(self) -> Split:
        """Where accuracy is measured: the test split (the validation split when none)."""
        return self.test if len(self.test) else self.val


def load_digits_splits(
    *, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = SPLIT_SEED
) -> Dataset:
    """Load digits and split it (stratified) into train, validation and test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be in (0, 1) and sum below 1")
    bunch = load_digits()
    raw = bunch.images.astype(np.float32).reshape(-1, *INPUT_SHAPE)
    y = bunch.target.astype(np.int64)
    idx = np.arange(len(y))
    rest, test_idx = train_test_split(
        idx, test_size=test_fraction, stratify=y, random_state=seed
    )
    train_idx, val_idx = train_test_split(
        rest,
        test_size=val_fraction / (1 - test_fraction),
        stratify=y[rest],
        random_state=seed,
    )
    scaled = raw[train_idx] / PIXEL_MAX
    norm = Normalization(PIXEL_MAX, float(scaled.mean()), float(scaled.std()))

    def split(ix: np.ndarray) -> Split:
        return Split(norm.apply(raw[ix]), y[ix].copy())

    return Dataset(
        name="sklearn.digits",
        train=split(train_idx),
        val=split(val_idx),
        test=split(test_idx),
        normalization=norm,
        split_seed=seed,
    )


# --------------------------------------------------------------------------- recipe data


def _as_split(x, y, what: str, input_shape: tuple[int, ...]) -> Split:
    from .errors import RecipeError

    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    y = np.ascontiguousarray(np.asarray(y).astype(np.int64))
    if x.ndim != 1 + len(input_shape) or tuple(x.shape[1:]) != tuple(input_shape):
        raise RecipeError(f"data {what}: inputs of shape {tuple(x.shape[1:])} do not match "
                          f"input_shape {list(input_shape)} (batch dimension removed)")
    if y.ndim != 1 or len(y) != len(x):
        raise RecipeError(f"data {what}: {len(x)} inputs but labels of shape {y.shape}")
    return Split(x, y)


def _materialize(ds, what: str, input_shape: tuple[int, ...]) -> Split:
    """A torch dataset of ``(input, label)`` pairs, read into arrays."""
    import torch

    from .errors import RecipeError

    xs, ys = [], []
    try:
        for i in range(len(ds)):
            x, y = ds[i]
            xs.append(torch.as_tensor(x, dtype=torch.float32).numpy())
            ys.append(int(y))
    except Exception as e:
        raise RecipeError(f"data {what}: cannot read item {len(xs)}: {e}") from e
    return _as_split(np.stack(xs) if xs else np.zeros((0, *input_shape), np.float32),
                     np.asarray(ys, np.int64), what, input_shape)


def load_recipe_data(source: str, input_shape: tuple[int, ...], base_dir: str = ".") -> Dataset:
    """Load the data a recipe names; ``input_shape`` excludes the batch dimension.

    * ``"digits"``: :func:`load_digits_splits` (train / val / test);
    * ``*.npz``: arrays ``x_train``, ``y_train``, ``x_val``, ``y_val`` (``x_test``,
      ``y_test`` optional);
    * ``"package.module:callable"``: returns ``(train, val)`` or ``(train, val, test)``
      torch datasets of ``(input, label)`` pairs.
    """
    from pathlib import Path

    from .errors import RecipeError
    from .recipe import import_callable

    empty = Split(np.zeros((0, *input_shape), np.float32), np.zeros(0, np.int64))
    if source == "digits":
        data = load_digits_splits()
        if tuple(input_shape) != data.input_shape:
            raise RecipeError(f"data 'digits' has inputs of shape {list(data.input_shape)}, "
                              f"the recipe's input_shape is {list(input_shape)}")
        return data
    if source.endswith(".npz"):
        path = Path(source).expanduser()
        if not path.is_absolute():
            path = Path(base_dir) / path
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except FileNotFoundError as e:
            raise RecipeError(f"data {str(path)!r} does not exist") from e
        except Exception as e:
            raise RecipeError(f"data {str(path)!r} does not load: {e}") from e
        missing = [k for k in ("x_train", "y_train", "x_val", "y_val") if k not in arrays]
        if missing:
            raise RecipeError(f"data {str(path)!r} lacks {', '.join(missing)}")
        train = _as_split(arrays["x_train"], arrays["y_train"], "x_train", input_shape)
        val = _as_split(arrays["x_val"], arrays["y_val"], "x_val", input_shape)
        test = (_as_split(arrays["x_test"], arrays["y_test"], "x_test", input_shape)
                if "x_test" in arrays and "y_test" in arrays else empty)
        name = path.name
    elif ":" in source:
        fn = import_callable(source, Path(base_dir), what="data")
        try:
            parts = fn()
        except Exception as e:
            raise RecipeError(f"data {source!r} failed: {e}") from e
        if not isinstance(parts, tuple | list) or len(parts) not in (2, 3):
            raise RecipeError(f"data {source!r} must return (train, val) or (train, val, test)")
        train = _materialize(parts[0], "train", input_shape)
        val = _materialize(parts[1], "val", input_shape)
        test = _materialize(parts[2], "test", input_shape) if len(parts) == 3 else empty
        name = source
    else:
        raise RecipeError(f"data source {source!r}: use 'digits', a .npz path or "
                          "'package.module:callable'")
    if len(train) == 0 or len(val) == 0:
        raise RecipeError(f"data {source!r}: the train and validation splits must not be empty")
    classes = int(max(train.y.max(), val.y.max(), test.y.max() if len(test) else 0)) + 1
    return Dataset(name=name, train=train, val=val, test=test, normalization=None,
                   split_seed=None, input_shape=tuple(input_shape), num_classes=classes)
