"""The digits data set (scikit-learn's bundled copy: nothing is downloaded).

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
    normalization: Normalization
    split_seed: int
    input_shape: tuple[int, ...] = INPUT_SHAPE
    num_classes: int = NUM_CLASSES

    def describe(self) -> dict:
        return {
            "name": self.name,
            "split_seed": self.split_seed,
            "train": len(self.train),
            "val": len(self.val),
            "test": len(self.test),
            "normalization": self.normalization.to_dict(),
        }


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
