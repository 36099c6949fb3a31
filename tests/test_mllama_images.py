"""Llama 3.2 Vision's image preprocessing against transformers' MllamaImageProcessor."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from herd.data.mllama_images import (
    MLLAMA_MEAN,
    MLLAMA_STD,
    best_grid,
    mllama_pixel_batch,
    tile_grids,
)

transformers = pytest.importorskip("transformers")

TILE = 56
SHAPES = [(40, 40), (56, 56), (30, 200), (200, 30), (100, 70), (57, 113), (300, 290), (7, 9)]


def random_image(height: int, width: int, seed: int, mode: str = "RGB") -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
    image = Image.fromarray(pixels.numpy(), mode="RGB")
    return image.convert(mode)


def test_the_grids_and_their_ids_are_the_releases():
    assert tile_grids(4) == ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))
    assert best_grid(560, 560, 4, 560) == (1, 1)  # fits a tile exactly
    assert best_grid(560, 1120, 4, 560) == (1, 2)  # twice as wide: one row, two tiles
    assert best_grid(2000, 2000, 4, 560) == (2, 2)  # too large for any: the least shrinking


@pytest.mark.parametrize("max_tiles", [1, 4, 6])
def test_pixels_ids_and_masks_equal_transformers(max_tiles):
    processor = transformers.MllamaImageProcessor(
        size={"height": TILE, "width": TILE},
        max_image_tiles=max_tiles,
        image_mean=list(MLLAMA_MEAN),
        image_std=list(MLLAMA_STD),
    )
    images = [random_image(h, w, seed) for seed, (h, w) in enumerate(SHAPES)]
    images[1] = images[1].convert("L")  # grayscale and palette images become RGB
    images[2] = images[2].convert("P")
    batch = [images[:3], images[3:4], images[4:]]  # 3, 1 and 4 images per sample
    expected = processor(images=batch, return_tensors="pt")
    ours = mllama_pixel_batch(batch, tile=TILE, max_tiles=max_tiles)
    assert ours["pixel_values"].shape == expected["pixel_values"].shape
    torch.testing.assert_close(ours["pixel_values"], expected["pixel_values"], atol=1e-6, rtol=0)
    assert torch.equal(ours["aspect_ratio_ids"], expected["aspect_ratio_ids"])
    assert torch.equal(ours["aspect_ratio_mask"], expected["aspect_ratio_mask"])
    assert ours["num_tiles"] == expected["num_tiles"]
