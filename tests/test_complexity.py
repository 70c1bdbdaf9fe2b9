"""The per-request complexity estimate: its fast single-image path agrees with the batch one."""

import numpy as np
import pytest

from prunefleet.agent.complexity import complexity_per_sample, estimate_complexity


@pytest.mark.parametrize("shape", [(1, 1, 8, 8), (8, 8), (1, 3, 5), (1, 1, 16, 9)])
def test_single_image_path_matches_the_batch_computation(shape):
    rng = np.random.default_rng(0)
    for i in range(300):
        x = (rng.normal(0, 1, shape) * (i % 3) + rng.normal(0, (i % 5) / 4, shape))
        x = x.astype(np.float32)
        assert estimate_complexity(x) == pytest.approx(float(complexity_per_sample(x).mean()),
                                                       abs=1e-5)


def test_flat_and_noisy_images_sit_at_the_ends():
    assert estimate_complexity(np.zeros((1, 1, 8, 8), np.float32)) == 0.0
    noise = np.random.default_rng(1).normal(0, 1, (1, 1, 8, 8)).astype(np.float32)
    assert estimate_complexity(noise) > 0.6
