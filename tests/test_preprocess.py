"""The model's input from pixels: normalisation by the model's own mean and std."""

from __future__ import annotations

import numpy as np

from pneumoscan.inference.preprocess import Preprocessing, normalise


def test_normalise_gives_each_channel_its_mean_and_std():
    prep = Preprocessing(height=2, width=128, channels=3, mean=(0.485, 0.456, 0.406),
                         std=(0.229, 0.224, 0.225))
    grey = np.arange(256, dtype=np.uint8).reshape(1, 2, 128)
    batch = np.concatenate([grey, grey[:, ::-1]])  # two images, every grey level in each
    out = normalise(batch, prep)
    assert out.shape == (2, 3, 2, 128) and out.dtype == np.float32
    for channel, (mean, std) in enumerate(zip(prep.mean, prep.std)):
        expected = (batch.astype(np.float64) / 255 - mean) / std
        np.testing.assert_allclose(out[:, channel], expected, rtol=1e-6, atol=1e-6)
