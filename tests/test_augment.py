"""Storage-robust augmentation (training/augment.py) on real training images."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from training.augment import FILTERS, Storage, apply, draw, draw_pair


@pytest.fixture(scope="module")
def xray(kermany224) -> np.ndarray:
    path = sorted((kermany224 / "PNEUMONIA").glob("*.jpeg"))[0]
    return np.asarray(Image.open(path).convert("L"))


def test_a_plain_storage_keeps_the_image(xray):
    assert np.array_equal(apply(xray, Storage(), xray.shape[0]), xray)


def test_draws_cover_every_way_of_storing_and_repeat_with_the_seed():
    draws = [draw(np.random.default_rng(seed)) for seed in range(400)]
    assert {d.filters[0] for d in draws} == set(FILTERS) == {d.filters[1] for d in draws}
    qualities = [d.jpeg_quality for d in draws]
    assert None in qualities
    stored = [q for q in qualities if q is not None]
    assert min(stored) <= 35 and max(stored) >= 90 and 30 <= min(stored) <= max(stored) <= 95
    assert {d.sixteen_bit for d in draws} == {False, True}
    intermediates = [d.intermediate for d in draws if d.intermediate is not None]
    assert min(intermediates) < 0.6 and max(intermediates) > 1.8  # down-and-up, and 2x down
    assert any(d.marker for d in draws) and any(d.blur for d in draws)
    assert any(d.sharpen for d in draws) and any(d.noise for d in draws)
    assert all(0.75 * 0.99 <= (d.crop[2] - d.crop[0]) * (d.crop[3] - d.crop[1]) <= 1
               for d in draws)
    assert draw(np.random.default_rng(7)) == draw(np.random.default_rng(7))
    assert not any(d.crop[0] > d.crop[2] for d in draws), "no flips unless asked"


def test_every_draw_gives_a_model_input(xray):
    rng = np.random.default_rng(0)
    for _ in range(50):
        out = apply(xray, draw(rng), 96)
        assert out.shape == (96, 96) and out.dtype == np.uint8


def test_lower_jpeg_quality_changes_the_image_more(xray):
    def error(quality):
        out = apply(xray, Storage(jpeg_quality=quality), xray.shape[0]).astype(float)
        return np.abs(out - xray).mean()

    assert error(30) > error(60) > error(95) > 0


def test_sixteen_bit_path_fills_the_grey_levels_an_8_bit_stretch_skips(xray):
    stretch = Storage(window=(0.2, 0.8))
    eight = apply(xray, stretch, xray.shape[0])
    sixteen = apply(xray, dataclasses.replace(stretch, sixteen_bit=True), xray.shape[0])
    # Stretching 8-bit data by 1/0.6 leaves about 40% of the levels in range unused.
    assert len(np.unique(eight)) < 0.75 * len(np.unique(sixteen))
    assert np.abs(eight.astype(float) - sixteen).mean() < 1.0


def test_resampling_filters_differ_and_a_mirrored_crop_is_a_flip(xray):
    crop = Storage(crop=(0.1, 0.05, 0.95, 0.9))
    outputs = {name: apply(xray, dataclasses.replace(crop, filters=(name, name)), 160)
               for name in FILTERS}
    assert len({out.tobytes() for out in outputs.values()}) == len(FILTERS)
    mirrored = apply(xray, dataclasses.replace(crop, crop=(0.95, 0.05, 0.1, 0.9)), 160)
    assert np.array_equal(mirrored, outputs["bilinear"][:, ::-1])


def test_a_marker_is_burnt_in_where_drawn(xray):
    marked = apply(xray, Storage(marker=("PORTABLE", 0.05, 0.05, 255)), xray.shape[0])
    changed = np.argwhere(marked != xray)
    assert len(changed) > 20
    assert changed.max(0).tolist() < [xray.shape[0] // 3, xray.shape[1] // 2]


def test_a_pair_differs_only_in_storage_noise(xray):
    """draw_pair: the two copies of a consistency pair share what a reader could see (crop,
    rotation, window, marker, ...) and differ in the last resampling filter, a shift of at
    most one output pixel, JPEG quality 60-95 or none, and about one grey level of noise."""
    rng = np.random.default_rng(0)
    shared = ("sixteen_bit", "window", "gamma", "rotation", "shift", "intermediate", "blur",
              "sharpen", "marker")
    pair_gaps, independent_gaps = [], []
    for _ in range(40):
        a, b = draw_pair(rng, 96, hflip=True)
        assert all(getattr(a, name) == getattr(b, name) for name in shared)
        assert a.filters[0] == b.filters[0]
        width, height = abs(a.crop[2] - a.crop[0]), abs(a.crop[3] - a.crop[1])
        assert width == pytest.approx(abs(b.crop[2] - b.crop[0]))
        for k, size in enumerate((width, height, width, height)):
            # each moved <= 1 px of the box before it lost a pixel at each side
            assert abs(a.crop[k] - b.crop[k]) <= 2 * size / (96 - 2) + 1e-12
            assert 0 <= min(a.crop[k], b.crop[k]) and max(a.crop[k], b.crop[k]) <= 1
        for copy in (a, b):
            assert copy.jpeg_quality is None or 60 <= copy.jpeg_quality <= 95
            assert copy.noise <= 1.5
        pair = [apply(xray, s, 96).astype(float) for s in (a, b)]
        pair_gaps.append(np.abs(pair[0] - pair[1]).mean())
        other = apply(xray, draw(rng), 96).astype(float)
        independent_gaps.append(np.abs(pair[0] - other).mean())
    assert np.median(pair_gaps) < 8 and np.median(pair_gaps) * 3 < np.median(independent_gaps)
