"""The pictures of one flake: where each comes from, and how it is drawn.

- the frame it was detected in, at the camera's own resolution (the registry's frames
  table maps its pixels to the wafer frame), cut around the flake;
- images stored with the flake (revisits at high magnification, crops), with the
  outline drawn on a revisit where the chip's wafer frame places it;
- the outline alone, to scale;
- the scan mosaic around it (an overview: the mosaic is coarse, ~10 µm per pixel).

Each is drawn with a scale bar and a legend (drawing.annotate). Files are found only
through ``files.resolve_inside``, so nothing outside the data folder is ever read.
"""

from __future__ import annotations

from dataclasses import dataclass
import json
from pathlib import Path

import cv2
import numpy as np

from flake_core import materials
from flake_core.geometry import Affine2D, pixel_to_wafer
from flake_registry.files import IMAGE_SUFFIXES, resolve_inside
from flake_registry.query import RegistryError
from flake_registry.store import FlakeDetail, FlakeImageRecord, FlakeRecord
from flake_registry.web import drawing
from flake_registry.web.context import WebContext

THUMB_PIXELS = 150


def legend(flake: FlakeRecord, compact: bool = False) -> list[tuple[str, str]]:
    return [(materials.colour(flake.material), drawing.flake_caption(
        flake.material, flake.layer_class, flake.thickness_nm, flake.thickness_nm_std, compact=compact))]


def data_file(ctx: WebContext, name: str, what: str = 'image') -> Path:
    """A file the registry names, only inside the data folder (raises RegistryError otherwise)."""
    return resolve_inside(ctx.data_dir, name, suffixes=IMAGE_SUFFIXES, allow_absolute=True, what=what)


def _readable(ctx: WebContext, name: str) -> Path | None:
    try:
        return data_file(ctx, name)
    except RegistryError:
        return None


# -- the detection frame ---------------------------------------------------------------------------


@dataclass
class FrameSource:
    path: Path
    to_pixels: Affine2D                         # wafer [m] -> frame pixels
    metres_per_pixel: float
    tile_index: int


def frame_source(ctx: WebContext, flake: FlakeRecord) -> FrameSource | None:
    """The full-resolution frame the flake was detected in, when the registry recorded it."""
    if not flake.scan_id:
        return None
    row = ctx.store.frames(flake.scan_id).get(flake.tile_index)
    if not row or not row.get('path'):
        return None
    path = _readable(ctx, row['path'])
    if path is None:
        return None
    pixel_to_wafer_map = Affine2D.from_list(row['pixel_to_wafer'])
    metres_per_pixel = row.get('pixel_size') or pixel_to_wafer_map.scale
    return FrameSource(path, pixel_to_wafer_map.inverse(), metres_per_pixel, flake.tile_index)


def frame_picture(ctx: WebContext, flake: FlakeRecord, whole: bool = False) -> np.ndarray | None:
    source = frame_source(ctx, flake)
    if source is None:
        return None
    pixels = drawing.read_image(source.path)
    if pixels is None:
        return None
    colour = materials.colour(flake.material)
    if whole:
        canvas = pixels.copy()
        points = source.to_pixels.apply_points(np.asarray(flake.contour or [(flake.x, flake.y)]).reshape(-1, 2))
        drawing.draw_outline(canvas, points, colour, 2)
        return drawing.annotate(canvas, source.metres_per_pixel, legend(flake), scale=1.4)
    return drawing.flake_window(pixels, flake.contour, (flake.x, flake.y), source.to_pixels,
                                source.metres_per_pixel, colour, legend(flake), margin=2.5, min_half=60,
                                min_display=360)


# -- images stored with the flake ------------------------------------------------------------------


def revisit_to_pixels(ctx: WebContext, flake: FlakeRecord, image: FlakeImageRecord, width: int,
                      height: int) -> Affine2D | None:
    """Wafer -> pixels of a revisit image: the stage was centred on the flake (chip's wafer frame, if known)."""
    if image.role != 'revisit' or not image.pixel_size or image.pixel_size <= 0:
        return None
    frame = ctx.store.wafer_frame(flake.chip_id) if hasattr(ctx.store, 'wafer_frame') else None
    stage_to_wafer = Affine2D.from_list(frame.stage_to_wafer) if frame is not None else Affine2D(1, 0, 0, 0, 1, 0)
    stage_x, stage_y = stage_to_wafer.inverse().apply(flake.x, flake.y)
    return pixel_to_wafer(stage_x, stage_y, image.pixel_size, width, height, stage_to_wafer).inverse()


def image_picture(ctx: WebContext, detail: FlakeDetail, index: int) -> np.ndarray:
    """A stored image of the flake with a scale bar (its pixel size) and the legend; a revisit shows the outline."""
    if not 0 <= index < len(detail.images):
        raise RegistryError('UNKNOWN_ID', f'flake {detail.flake.id} has no image {index}')
    image = detail.images[index]
    path = data_file(ctx, image.path)
    pixels = drawing.read_image(path)
    if pixels is None:
        raise RegistryError('UNKNOWN_ID', f'image {index} of flake {detail.flake.id} cannot be read')
    flake = detail.flake
    canvas = pixels.copy()
    to_pixels = revisit_to_pixels(ctx, flake, image, canvas.shape[1], canvas.shape[0])
    if to_pixels is not None and len(flake.contour) >= 3:
        points = to_pixels.apply_points(np.asarray(flake.contour).reshape(-1, 2))
        drawing.draw_outline(canvas, points, materials.colour(flake.material), 2)
    lines = legend(flake) + [('#ffffff', f'{image.role}{" · " + image.objective if image.objective else ""}')]
    return drawing.annotate(canvas, image.pixel_size or None, lines)


# -- outline, mosaic overview, thumbnail -----------------------------------------------------------


def outline_picture(flake: FlakeRecord, size: int = 320) -> np.ndarray:
    return drawing.outline_picture(flake.contour, size, materials.colour(flake.material), legend(flake))


def read_mosaic_meta(ctx: WebContext, scan_id: str) -> dict | None:
    """The scan mosaic's size, pixel size and wafer -> mosaic map (None when the scan has none)."""
    try:
        path = resolve_inside(ctx.data_dir, f'scans/{scan_id}/mosaic.png', what='mosaic')
        meta_path = resolve_inside(ctx.data_dir, f'scans/{scan_id}/mosaic.json', suffixes=frozenset({'.json'}),
                                   what='mosaic description')
        meta = json.loads(meta_path.read_text())
        width, height = drawing.png_size(path)
        meta['to_mosaic'] = Affine2D.from_list(meta['wafer_to_mosaic'])
    except (RegistryError, OSError, ValueError, KeyError, TypeError):
        return None
    meta.update(width=width, height=height, path=path)
    return meta


def mosaic_picture(ctx: WebContext, flake: FlakeRecord, size: int, margin: float = 3.0,
                   compact: bool = False) -> np.ndarray | None:
    meta = read_mosaic_meta(ctx, flake.scan_id) if flake.scan_id else None
    if meta is None:
        return None
    pixels = ctx.mosaics.get(meta['path'])
    if pixels is None:
        return None
    return drawing.flake_window(pixels, flake.contour, (flake.x, flake.y), meta['to_mosaic'],
                                meta.get('metres_per_pixel') or 1 / meta['to_mosaic'].scale,
                                materials.colour(flake.material), legend(flake, compact), margin=margin,
                                out_size=size, min_half=6)


def thumbnail(ctx: WebContext, detail: FlakeDetail, size: int = THUMB_PIXELS) -> np.ndarray:
    """The sharpest small picture there is: a stored crop, the frame, the mosaic, else the outline."""
    flake = detail.flake
    for image in detail.images:
        if image.role in ('thumbnail', 'crop'):
            path = _readable(ctx, image.path)
            pixels = drawing.read_image(path) if path else None
            if pixels is not None:
                small = cv2.resize(pixels, (size, size), interpolation=cv2.INTER_AREA)
                scale = pixels.shape[1] / size
                return drawing.annotate(small, image.pixel_size * scale if image.pixel_size else None,
                                       legend(flake, compact=True))
    source = frame_source(ctx, flake)
    if source is not None:
        pixels = drawing.read_image(source.path)
        if pixels is not None:
            picture = drawing.flake_window(pixels, flake.contour, (flake.x, flake.y), source.to_pixels,
                                           source.metres_per_pixel, materials.colour(flake.material),
                                           legend(flake, compact=True), margin=1.6, out_size=size)
            if picture is not None:
                return picture
    picture = mosaic_picture(ctx, flake, size, margin=1.6, compact=True)
    if picture is not None:
        return picture
    return drawing.outline_picture(flake.contour, size, materials.colour(flake.material), legend(flake, compact=True))
