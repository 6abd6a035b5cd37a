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


def bin_frame(image: np.ndarray, pixel_to_wafer: Affine2D, factor: int) -> tuple[np.ndarray, Affine2D]:
    """``image`` averaged over ``factor`` x ``factor`` blocks, and the map of its pixels to the wafer.

    A revisit capture at 50x resolves a flake far better than the scan did; binning it 2 x 2
    keeps most of that while the detector reads a quarter of the pixels and its smallest
    reported region (in pixels) covers four times the area on the chip.
    """
    if factor <= 1:
        return image, pixel_to_wafer
    height, width = image.shape[:2]
    binned = cv2.resize(image[:height - height % factor, :width - width % factor],
                        (width // factor, height // factor), interpolation=cv2.INTER_AREA)
    # Binned pixel centre (i, j) is the mean of frame pixels factor*i .. factor*i + factor - 1.
    to_frame = Affine2D(float(factor), 0.0, (factor - 1) / 2.0, 0.0, float(factor), (factor - 1) / 2.0)
    return binned, to_frame.then(pixel_to_wafer)


def feather(height: int, width: int, ramp_px: float) -> np.ndarray:
    """Weights (H, W) rising from near 0 at a frame's border to 1 at ``ramp_px`` inside it.

    Where frames overlap, each pixel of the mosaic is the weighted mean of the frames under
    it, so one frame fades into the next instead of ending at a visible seam.
    """
    if ramp_px <= 0:
        return np.ones((height, width), np.float32)
    across = np.minimum(np.arange(width), np.arange(width)[::-1]).astype(np.float32)
    down = np.minimum(np.arange(height), np.arange(height)[::-1]).astype(np.float32)
    return np.clip((np.minimum(down[:, None], across[None, :]) + 1.0) / (ramp_px + 1.0), 0.0, 1.0)


def flat_field(frames: list[np.ndarray], min_frames: int = 8, sample: int = 48) -> np.ndarray | None:
    """The shading the frames share (vignetting, uneven illumination), mean 1 per channel; None when
    there are too few frames of one size to tell it from the sample.

    The per-pixel median of many frames is bare substrate almost everywhere, so its smooth
    shape is the optics', not the chip's. Dividing each frame by it removes the bright
    centre and dark corners that make every field of a mosaic stand out.
    """
    shapes = {f.shape for f in frames}
    if len(frames) < min_frames or len(shapes) != 1 or frames[0].ndim != 3:
        return None
    chosen = frames[::max(1, len(frames) // sample)][:sample]
    median = np.median(np.stack(chosen).astype(np.float32), axis=0)
    height, width = median.shape[:2]
    sigma = max(height, width) / 16.0
    smooth = cv2.GaussianBlur(median, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    mean = smooth.reshape(-1, 3).mean(axis=0)
    if np.any(mean <= 0):
        return None
    return np.clip(smooth / mean, 0.2, 5.0).astype(np.float32)


class Mosaic:
    """A downsampled picture of a wafer-frame region assembled from frames.

    Every frame is warped into the mosaic canvas through its pixel -> wafer map, so
    rotation of the chip on the stage is handled and overlapping frames agree. With
    ``blend_px`` > 0 overlapping frames are blended over a ramp of that many (frame)
    pixels from their borders; with 0 each frame is pasted over the ones before it.
    """

    def __init__(self, min_x: float, min_y: float, max_x: float, max_y: float,
                 metres_per_pixel: float, max_pixels: int = 4096, blend_px: float = 0.0):
        if metres_per_pixel <= 0:
            raise ValueError('mosaic resolution must be positive')
        width = math.ceil((max_x - min_x) / metres_per_pixel)
        height = math.ceil((max_y - min_y) / metres_per_pixel)
        scale = max(1.0, max(width, height) / max_pixels)
        self.metres_per_pixel = metres_per_pixel * scale
        self.width = max(1, math.ceil((max_x - min_x) / self.metres_per_pixel))
        self.height = max(1, math.ceil((max_y - min_y) / self.metres_per_pixel))
        self.min_x, self.max_y = min_x, max_y
        self.blend_px = float(blend_px)
        self._pasted = np.full((self.height, self.width, 3), 255, np.uint8) if blend_px <= 0 else None
        self._sum = np.zeros((self.height, self.width, 3), np.float32) if blend_px > 0 else None
        self._weight = np.zeros((self.height, self.width), np.float32) if blend_px > 0 else None
        self.frames = 0

    @property
    def canvas(self) -> np.ndarray:
        """The mosaic (BGR, uint8); white where no frame reached."""
        if self._pasted is not None:
            return self._pasted
        covered = self._weight > 1e-6
        out = np.full((self.height, self.width, 3), 255, np.uint8)
        out[covered] = np.clip(self._sum[covered] / self._weight[covered, None] + 0.5, 0, 255).astype(np.uint8)
        return out

    def wafer_to_mosaic(self) -> Affine2D:
        """Mosaic pixel (column right = wafer +x, row down = wafer -y)."""
        m = self.metres_per_pixel
        return Affine2D(1.0 / m, 0.0, -self.min_x / m, 0.0, -1.0 / m, self.max_y / m)

    def add(self, image: np.ndarray, pixel_to_wafer: Affine2D, blend_px: float | None = None) -> None:
        """Warp ``image`` into the mosaic; ``blend_px`` (in ``image`` pixels) overrides the mosaic's ramp."""
        to_mosaic = pixel_to_wafer.then(self.wafer_to_mosaic())
        matrix = np.array([[to_mosaic.a, to_mosaic.b, to_mosaic.c],
                           [to_mosaic.d, to_mosaic.e, to_mosaic.f]], np.float64)
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        ramp = self.blend_px if blend_px is None else blend_px
        # Shrink first so warpAffine does not alias a 1024 px frame onto a few pixels.
        shrink = 1.0 / max(abs(to_mosaic.scale), 1e-12)
        if shrink > 2.0:
            factor = int(shrink // 2)
            image = cv2.resize(image, (max(1, image.shape[1] // factor), max(1, image.shape[0] // factor)),
                               interpolation=cv2.INTER_AREA)
            matrix[:, :2] *= factor
            ramp /= factor
        self.frames += 1
        if self._pasted is not None:
            cv2.warpAffine(image, matrix, (self.width, self.height), dst=self._pasted,
                           flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_TRANSPARENT)
            return
        # Only the canvas window the frame covers is warped and accumulated.
        height, width = image.shape[:2]
        corners = np.array([[0, 0, 1], [width, 0, 1], [0, height, 1], [width, height, 1]], np.float64) @ matrix.T
        x0, y0 = np.floor(corners.min(axis=0)).astype(int) - 1
        x1, y1 = np.ceil(corners.max(axis=0)).astype(int) + 2
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, self.width), min(y1, self.height)
        if x1 <= x0 or y1 <= y0:
            return
        local = matrix.copy()
        local[:, 2] -= (x0, y0)
        weights = feather(height, width, ramp)
        size = (x1 - x0, y1 - y0)
        warped = cv2.warpAffine(image.astype(np.float32) * weights[..., None], local, size, flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
        warped_weight = cv2.warpAffine(weights, local, size, flags=cv2.INTER_LINEAR,
                                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        self._sum[y0:y1, x0:x1] += warped
        self._weight[y0:y1, x0:x1] += warped_weight

    def wafer_to_pixel(self, x: float, y: float) -> tuple[int, int]:
        u, v = self.wafer_to_mosaic().apply(x, y)
        return int(round(u)), int(round(v))


class MosaicBuilder:
    """Collects shrunken frames of a scan whose extent is not known in advance, and
    renders them into a ``Mosaic`` covering everything seen so far.

    ``blend_px``: the ramp over which overlapping frames are blended [frame pixels]; with
    it, the shading the frames share (``flat_field``) is divided out before blending.
    """

    def __init__(self, metres_per_pixel: float, max_pixels: int = 4096, blend_px: float = 0.0):
        if metres_per_pixel <= 0:
            raise ValueError('mosaic resolution must be positive')
        self.metres_per_pixel = metres_per_pixel
        self.max_pixels = max_pixels
        self.blend_px = float(blend_px)
        self._frames: list[tuple[np.ndarray, Affine2D, int]] = []
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
        self._frames.append((small, to_wafer, factor))
        corners = pixel_to_wafer.apply_points(np.array([[0, 0], [width, 0], [0, height], [width, height]]))
        self.bounds = [min(self.bounds[0], corners[:, 0].min()), min(self.bounds[1], corners[:, 1].min()),
                       max(self.bounds[2], corners[:, 0].max()), max(self.bounds[3], corners[:, 1].max())]

    def render(self) -> Mosaic:
        if not self._frames:
            raise ValueError('no frames in the mosaic yet')
        mosaic = Mosaic(*self.bounds, metres_per_pixel=self.metres_per_pixel, max_pixels=self.max_pixels,
                        blend_px=self.blend_px)
        shading = flat_field([small for small, _, _ in self._frames]) if self.blend_px > 0 else None
        for small, to_wafer, factor in self._frames:
            if shading is not None:
                small = np.clip(small.astype(np.float32) / shading, 0, 255)
            mosaic.add(small, to_wafer, blend_px=self.blend_px / factor)
        return mosaic
