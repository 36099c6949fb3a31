"""Images for the released Llama 3.2 Vision encoder, prepared as the release prepares them.

An image is shown to the encoder as a grid of square tiles (560 px in the release, up to 4):

    1. the grid: among every (rows, cols) with rows * cols <= max_tiles, the canvas
       (rows * tile, cols * tile) that needs the least upscaling to hold the image (if
       any canvas can be reached by upscaling), else the least downscaling; ties go to the
       smaller canvas;
    2. resize, keeping the aspect ratio, so that the image fills the canvas along one side
       (never smaller than a tile, never larger than the canvas), bilinear with antialiasing;
    3. pad with black to the canvas, right and bottom;
    4. cut into rows * cols tiles in reading order, scale to [0, 1] and normalise by the
       checkpoint's mean and std.

A batch is `pixel_values` [B, I, max_tiles, 3, tile, tile] (missing tiles and images are
zeros), `aspect_ratio_ids` [B, I] (1 + the grid's index among the supported ones; 0 for a
missing image), `aspect_ratio_mask` [B, I, max_tiles] (1 for the grid's tiles; the first
tile of every slot is 1, as the release does for padded images) and `num_tiles`.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torchvision.transforms.v2 import functional as TF

from herd.models.mllama_vision import MLLAMA_MEAN, MLLAMA_STD


@lru_cache(maxsize=16)
def tile_grids(max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every (rows, cols) grid of at most `max_tiles` tiles, in the release's order (its
    aspect-ratio ids count from 1 in this order)."""
    return tuple(
        (rows, cols)
        for rows in range(1, max_tiles + 1)
        for cols in range(1, max_tiles + 1)
        if rows * cols <= max_tiles
    )


def best_grid(height: int, width: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """The (rows, cols) grid whose canvas holds an image of this size best (step 1)."""

    def scale(grid):  # how much the image must grow (> 1) or shrink (< 1) to fit the canvas
        rows, cols = grid
        return min(rows * tile / height, cols * tile / width)

    grids = tile_grids(max_tiles)
    scales = [scale(g) for g in grids]
    growing = [s for s in scales if s >= 1]
    chosen = min(growing) if growing else max(scales)
    candidates = [g for g, s in zip(grids, scales, strict=True) if s == chosen]
    return min(candidates, key=lambda g: g[0] * g[1])  # the first of the smallest canvases


def fit_to_canvas(height: int, width: int, canvas: tuple[int, int], tile: int) -> tuple[int, int]:
    """The image's size once resized into the canvas (step 2): (height, width)."""
    target_h = min(max(height, tile), canvas[0])
    target_w = min(max(width, tile), canvas[1])
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def image_tiles(
    image: torch.Tensor,
    tile: int = 560,
    max_tiles: int = 4,
    mean: tuple[float, ...] = MLLAMA_MEAN,
    std: tuple[float, ...] = MLLAMA_STD,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """uint8 [3, H, W] -> (tiles [rows * cols, 3, tile, tile] normalised, (rows, cols))."""
    height, width = image.shape[-2:]
    rows, cols = best_grid(height, width, max_tiles, tile)
    size = fit_to_canvas(height, width, (rows * tile, cols * tile), tile)
    image = TF.resize(
        image, list(size), interpolation=TF.InterpolationMode.BILINEAR, antialias=True
    )
    image = TF.pad(image, [0, 0, cols * tile - size[1], rows * tile - size[0]], fill=0)
    tiles = (
        image.reshape(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4).reshape(-1, 3, tile, tile)
    )
    tiles = tiles.float() / 255.0
    return TF.normalize(tiles, list(mean), list(std)), (rows, cols)


def as_rgb_uint8(image) -> torch.Tensor:
    """A PIL image or a uint8 tensor [C, H, W] (1 or 3 channels) -> uint8 [3, H, W]."""
    if not isinstance(image, torch.Tensor):
        image = TF.pil_to_tensor(image.convert("RGB"))
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(
            f"expected a uint8 image [1 or 3, H, W], got {image.dtype} {tuple(image.shape)}"
        )
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def mllama_pixel_batch(
    images: list[list],
    tile: int = 560,
    max_tiles: int = 4,
    mean: tuple[float, ...] = MLLAMA_MEAN,
    std: tuple[float, ...] = MLLAMA_STD,
) -> dict:
    """Each sample's images (PIL or uint8 tensors) -> the batch the encoder reads (see the
    module docstring)."""
    batch, slots = len(images), max(len(sample) for sample in images)
    pixel_values = torch.zeros(batch, slots, max_tiles, 3, tile, tile)
    aspect_ratio_ids = torch.zeros(batch, slots, dtype=torch.long)
    aspect_ratio_mask = torch.zeros(batch, slots, max_tiles, dtype=torch.long)
    aspect_ratio_mask[:, :, 0] = 1
    num_tiles = []
    grids = tile_grids(max_tiles)
    for b, sample in enumerate(images):
        num_tiles.append([])
        for i, image in enumerate(sample):
            tiles, grid = image_tiles(as_rgb_uint8(image), tile, max_tiles, mean, std)
            pixel_values[b, i, : len(tiles)] = tiles
            aspect_ratio_ids[b, i] = grids.index(grid) + 1
            aspect_ratio_mask[b, i, : len(tiles)] = 1
            num_tiles[-1].append(len(tiles))
    return {
        "pixel_values": pixel_values,
        "aspect_ratio_ids": aspect_ratio_ids,
        "aspect_ratio_mask": aspect_ratio_mask,
        "num_tiles": num_tiles,
    }


__all__ = [
    "MLLAMA_MEAN",
    "MLLAMA_STD",
    "best_grid",
    "fit_to_canvas",
    "image_tiles",
    "mllama_pixel_batch",
    "tile_grids",
]
