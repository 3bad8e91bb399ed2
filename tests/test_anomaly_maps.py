"""Anomaly map PNGs: layout, colours that rise with the error, safe unique names."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.anomaly_maps import composite, heat_colors, map_name, write_map


@pytest.mark.parametrize("channels", [1, 3])
def test_composite_size_and_heat_peak(channels):
    height, width, scale = 8, 6, 4
    rng = np.random.default_rng(0)
    image = rng.random((channels, height, width))
    reconstruction = rng.random((channels, height, width))
    errors = np.zeros((height, width))
    errors[5, 2] = 3.0
    errors[1, 1] = 1.0
    picture = composite(image, reconstruction, errors, scale=scale)
    assert picture.mode == "RGB"
    assert picture.size == (3 * width * scale + 4, height * scale)
    heat = np.asarray(picture)[:, 2 * (width * scale + 2):].astype(int).sum(axis=2)
    assert heat.shape == (height * scale, width * scale)
    peak = np.unravel_index(np.argmax(heat), heat.shape)
    assert (peak[0] // scale, peak[1] // scale) == (5, 2)
    assert heat.max() == 3 * 255  # the default vmax is the map's maximum: the peak is white


def test_composite_of_an_all_zero_map_is_black_and_shared_vmax_is_respected():
    image = np.zeros((1, 4, 4))
    heat = np.asarray(composite(image, image, np.zeros((4, 4)), scale=1))[:, 12:]
    assert heat.max() == 0
    faint = np.asarray(composite(image, image, np.full((4, 4), 0.5), vmax=10.0, scale=1))[:, 12:]
    assert 0 < faint.sum(axis=2).max() < 3 * 255


def test_heat_colors_brightness_rises_with_value():
    values = np.linspace(0, 1.2, 200).reshape(10, 20)
    colors = heat_colors(values, vmax=1.0)
    assert colors.shape == (10, 20, 3) and colors.dtype == np.uint8
    brightness = colors.reshape(-1, 3).astype(int).sum(axis=1)
    assert np.all(np.diff(brightness) >= 0) and brightness[0] == 0 and brightness[-1] == 3 * 255
    assert tuple(heat_colors(np.array([[0.5]]), 1.0)[0, 0]) == (255, 128, 0)  # mid-range is orange-red
    with pytest.raises(ValueError):
        heat_colors(values, vmax=0.0)


def test_write_map_writes_a_readable_png(tmp_path):
    rng = np.random.default_rng(1)
    target = tmp_path / "maps" / "nested" / map_name("good/cat 01.png")
    written = write_map(target, rng.random((3, 5, 7)), rng.random((3, 5, 7)), rng.random((5, 7)))
    assert written == target
    with Image.open(target) as opened:
        assert opened.format == "PNG" and opened.size == (3 * 7 * 4 + 4, 5 * 4)
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temp file left


def test_map_names_are_safe_and_unique():
    items = ["a b.png", "a_b.png", "/data/x/../y:z.png", "C:\\imgs\\q.png", "f.npy[3]", "." * 5, "x/" + "n" * 400]
    names = [map_name(item) for item in items]
    assert len(set(names)) == len(names)
    for name in names:
        assert name.endswith(".png") and "/" not in name and "\\" not in name and not name.startswith(".")
        assert len(name) < 200
    assert map_name("good/cat_01.png").startswith("good__cat_01.png-")
    assert map_name("a b.png") == map_name("a b.png")
