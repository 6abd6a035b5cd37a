"""Frames to detector tiles, and a downsampled mosaic of the scanned region (pure core)."""

from __future__ import annotations

from dataclasses import dataclass
import math

import cv2
import numpy as np

from flake_core.geometry import Affine2D


@dataclass(frozen=True)
class Tile:
    """A window of a frame with its own pixel -> wafer map."""

    u0: int
    v0: int
    pixels: np.ndarray
    pixel_to_wafer: Affine2D
    index_in_frame: int


def tile_origins(length: int, tile: int, overlap: int) -> list[int]:
    if tile >= length:
        return [0]
    step = tile - overlap
    if step <= 0:
        raise ValueError(f'tile overlap {overlap} must be smaller than the tile size {tile}')
    origins = list(range(0, length - tile + 1, step))
    if origins[-1] != length - tile:
        origins.append(length - tile)
    return origins


def split_frame(image: np.ndarray, pixel_to_wafer: Affine2D, tile_size: int,
                overlap: int) -> list[Tile]:
    """Cut ``image`` into ``tile_size`` squares overlapping by ``overlap`` px.

    A tile size of 0 or one at least the frame's size returns the frame as one tile.
    """
    height, width = image.shape[:2]
    if tile_size <= 0 or (tile_size >= width and tile_size >= height):
        return [Tile(0, 0, image, pixel_to_wafer, 0)]
    tiles = []
    for v0 in tile_origins(height, tile_size, overlap):
        for u0 in tile_origins(width, tile_size, overlap):
            shift = Affine2D(1.0, 0.0, float(u0), 0.0, 1.0, float(v0))
            window = image[v0:v0 + tile_size, u0:u0 + tile_size]
            tiles.append(Tile(u0, v0, window, shift.then(pixel_to_wafer), len(tiles)))
    return tiles


class Mosaic:
    """A downsampled picture of a wafer-frame region assembled from frames.

    Every frame is warped into the mosaic canvas through its pixel -> wafer map, so
    rotation of the chip on the stage is handled and overlapping frames agree.
    """

    def __init__(self, min_x: float, min_y: float, max_x: float, max_y: float,
                 metres_per_pixel: float, max_pixels: int = 4096):
        if metres_per_pixel <= 0:
            raise ValueError('mosaic resolution must be positive')
        width = math.ceil((max_x - min_x) / metres_per_pixel)
        height = math.ceil((max_y - min_y) / metres_per_pixel)
        scale = max(1.0, max(width, height) / max_pixels)
        self.metres_per_pixel = metres_per_pixel * scale
        self.width = max(1, math.ceil((max_x - min_x) / self.metres_per_pixel))
        self.height = max(1, math.ceil((max_y - min_y) / self.metres_per_pixel))
        self.min_x, self.max_y = min_x, max_y
        self.canvas = np.full((self.height, self.width, 3), 255, np.uint8)
        self.frames = 0

    def wafer_to_mosaic(self) -> Affine2D:
        """Mosaic pixel (column right = wafer +x, row down = wafer -y)."""
        m = self.metres_per_pixel
        return Affine2D(1.0 / m, 0.0, -self.min_x / m, 0.0, -1.0 / m, self.max_y / m)

    def add(self, image: np.ndarray, pixel_to_wafer: Affine2D) -> None:
        to_mosaic = pixel_to_wafer.then(self.wafer_to_mosaic())
        matrix = np.array([[to_mosaic.a, to_mosaic.b, to_mosaic.c],
                           [to_mosaic.d, to_mosaic.e, to_mosaic.f]], np.float64)
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        # Shrink first so warpAffine does not alias a 1024 px frame onto a few pixels.
        shrink = 1.0 / max(abs(to_mosaic.scale), 1e-12)
        if shrink > 2.0:
            factor = int(shrink // 2)
            image = cv2.resize(image, (max(1, image.shape[1] // factor), max(1, image.shape[0] // factor)),
                               interpolation=cv2.INTER_AREA)
            matrix[:, :2] *= factor
        cv2.warpAffine(image, matrix, (self.width, self.height), dst=self.canvas,
                       flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_TRANSPARENT)
        self.frames += 1

    def wafer_to_pixel(self, x: float, y: float) -> tuple[int, int]:
        u, v = self.wafer_to_mosaic().apply(x, y)
        return int(round(u)), int(round(v))


class MosaicBuilder:
    """Collects shrunken frames of a scan whose extent is not known in advance, and
    renders them into a ``Mosaic`` covering everything seen so far."""

    def __init__(self, metres_per_pixel: float, max_pixels: int = 4096):
        if metres_per_pixel <= 0:
            raise ValueError('mosaic resolution must be positive')
        self.metres_per_pixel = metres_per_pixel
        self.max_pixels = max_pixels
        self._frames: list[tuple[np.ndarray, Affine2D]] = []
        self.bounds = [math.inf, math.inf, -math.inf, -math.inf]

    def __len__(self) -> int:
        return len(self._frames)

    def add(self, image: np.ndarray, pixel_to_wafer: Affine2D) -> None:
        height, width = image.shape[:2]
        factor = max(1, int(self.metres_per_pixel / max(pixel_to_wafer.scale, 1e-15) // 2))
        small = cv2.resize(image, (max(1, width // factor), max(1, height // factor)),
                           interpolation=cv2.INTER_AREA) if factor > 1 else image.copy()
        to_wafer = Affine2D(float(factor), 0.0, (factor - 1) / 2.0, 0.0, float(factor),
                            (factor - 1) / 2.0).then(pixel_to_wafer)
        self._frames.append((small, to_wafer))
        corners = pixel_to_wafer.apply_points(np.array([[0, 0], [width, 0], [0, height], [width, height]]))
        self.bounds = [min(self.bounds[0], corners[:, 0].min()), min(self.bounds[1], corners[:, 1].min()),
                       max(self.bounds[2], corners[:, 0].max()), max(self.bounds[3], corners[:, 1].max())]

    def render(self) -> Mosaic:
        if not self._frames:
            raise ValueError('no frames in the mosaic yet')
        mosaic = Mosaic(*self.bounds, metres_per_pixel=self.metres_per_pixel, max_pixels=self.max_pixels)
        for small, to_wafer in self._frames:
            mosaic.add(small, to_wafer)
        return mosaic
