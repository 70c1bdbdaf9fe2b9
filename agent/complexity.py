"""How hard an input looks, estimated from its pixels alone (numpy, no model).

The policy uses this to spend a more expensive variant only on inputs that need it. Two
cues, both invariant to the input's offset and scale (so the caller's normalisation does
not matter):

- *roughness*: energy of the differences between neighbouring pixels relative to the
  image's variance. A smooth stroke scores about 0.3-0.6; white noise scores 1.
- *clutter*: how little of the image is flat background. A clean digit is about half
  background (pixels within 10 % of the range above the minimum); noise leaves almost none.

Each cue is mapped linearly onto [0, 1] and the score is their mean. On scikit-learn's
8x8 digits a clean image scores about 0.1-0.3; the same image with Gaussian noise of
sigma 0.5 (in standardised units) scores above 0.6. A batch costs a few tens of
microseconds.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["Ewma", "complexity_per_sample", "estimate_complexity"]

# Roughness of 0.3 or less counts as smooth (0); 1.0 (white noise) counts as rough (1).
_ROUGH_LO = 0.3
_ROUGH_HI = 1.0
# A pixel is background when within this fraction of the range above the image's minimum.
_BACKGROUND_BAND = 0.1
# A background share of this much or more counts as uncluttered (0).
_BACKGROUND_FULL = 0.5
_EPS = 1e-12


def _as_images(x: np.ndarray) -> np.ndarray:
    """View ``x`` as (N, H, W): the last two axes are the image, the rest are the batch."""
    a = np.asarray(x, dtype=np.float32)
    if a.ndim == 0:
        return a.reshape(1, 1, 1)
    if a.ndim == 1:
        return a.reshape(1, 1, -1)
    return a.reshape(-1, a.shape[-2], a.shape[-1])


def complexity_per_sample(x: np.ndarray) -> np.ndarray:
    """Score of each image in ``x`` (shape (..., H, W)), as a float64 array in [0, 1]."""
    img = _as_images(x)
    n, h, w = img.shape
    if img.size == 0:
        return np.zeros(n)
    flat = img.reshape(n, -1)
    size = flat.shape[1]
    lo = flat.min(axis=1)
    span = flat.max(axis=1) - lo
    centred = flat - flat.sum(axis=1, keepdims=True) / size
    var = np.einsum("ij,ij->i", centred, centred) / size

    # Mean squared neighbour difference, averaged over the axes that have neighbours.
    diff_energy = np.zeros(n, dtype=np.float32)
    axes = 0
    if w > 1:
        d = img[:, :, 1:] - img[:, :, :-1]
        diff_energy += np.einsum("nij,nij->n", d, d) / d[0].size
        axes += 1
    if h > 1:
        d = img[:, 1:, :] - img[:, :-1, :]
        diff_energy += np.einsum("nij,nij->n", d, d) / d[0].size
        axes += 1
    # For white noise E[(a - b)^2] = 2 var, so the ratio is about 1.
    roughness = diff_energy / max(axes, 1) / (2.0 * var + _EPS)
    rough = (roughness - _ROUGH_LO) / (_ROUGH_HI - _ROUGH_LO)

    background = (flat - lo[:, None] <= _BACKGROUND_BAND * span[:, None]).sum(axis=1)
    clutter = 1.0 - background / (_BACKGROUND_FULL * size)

    score = 0.5 * np.minimum(np.maximum(rough, 0.0), 1.0) + 0.5 * np.maximum(clutter, 0.0)
    # A flat image (no variance) is as simple as an input gets.
    return np.where(span > _EPS, score, 0.0)


def _one_image(img: np.ndarray) -> float:
    """The score of one (H, W) image with H, W > 1: the same arithmetic as
    :func:`complexity_per_sample` in fewer numpy calls (this runs on every request)."""
    flat = img.ravel()
    lo = float(flat.min())
    span = float(flat.max()) - lo
    if span <= _EPS:
        return 0.0
    size = flat.size
    centred = flat - float(flat.sum()) / size
    var = float(centred @ centred) / size
    dx = (img[:, 1:] - img[:, :-1]).ravel()
    dy = (img[1:, :] - img[:-1, :]).ravel()
    diff_energy = (float(dx @ dx) / dx.size + float(dy @ dy) / dy.size) / 2.0
    rough = (diff_energy / (2.0 * var + _EPS) - _ROUGH_LO) / (_ROUGH_HI - _ROUGH_LO)
    background = int(np.count_nonzero(flat - lo <= _BACKGROUND_BAND * span))
    clutter = 1.0 - background / (_BACKGROUND_FULL * size)
    return 0.5 * min(max(rough, 0.0), 1.0) + 0.5 * max(clutter, 0.0)


def estimate_complexity(x: np.ndarray) -> float:
    """Mean score over the images in ``x``, in [0, 1]; higher means harder."""
    if isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim >= 2:
        h, w = x.shape[-2:]
        if h > 1 and w > 1 and x.size == h * w:
            return _one_image(x.reshape(h, w))
    scores = complexity_per_sample(x)
    return float(scores.mean()) if scores.size else 0.0


class Ewma:
    """Exponentially weighted moving average; the first sample sets the value.

    ``alpha`` is the weight of each new sample (0 < alpha <= 1). Not thread-safe: keep one
    per consumer.
    """

    def __init__(self, alpha: float = 0.2) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self._value: float | None = None

    @classmethod
    def from_half_life(cls, samples: float) -> Ewma:
        """An average in which a sample's weight halves after ``samples`` newer ones."""
        if samples <= 0:
            raise ValueError(f"half life must be positive, got {samples}")
        return cls(alpha=1.0 - math.pow(0.5, 1.0 / samples))

    @property
    def value(self) -> float | None:
        return self._value

    def update(self, sample: float) -> float:
        """Fold ``sample`` in and return the new average; NaN samples are ignored."""
        if math.isnan(sample):
            return self._value if self._value is not None else sample
        if self._value is None:
            self._value = float(sample)
        else:
            self._value += self.alpha * (float(sample) - self._value)
        return self._value

    def reset(self) -> None:
        self._value = None
