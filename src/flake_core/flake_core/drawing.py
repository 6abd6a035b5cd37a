"""Every picture the system draws for people: scale bars, legends, outlines, cut-outs, mosaics.

Each picture carries a scale bar of a round length (1, 2 or 5 x 10^k) at its own pixel size
and a legend of the material, layer class and thickness it shows, in the material's one colour
from ``flake_core.materials``. Text is drawn with DejaVu Sans (shipped with matplotlib) so that
um and nm read as people write them. The scan report, the command-line overlays and the web
app all draw through this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache
from importlib import resources
import math
from typing import Protocol

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from flake_core import materials
from flake_core.geometry import Affine2D
from flake_core.units import length_label, with_uncertainty

BAR_FRACTION = 0.22                 # a scale bar is about this share of the picture's width
BACKDROP = (16, 20, 28)             # dark backing behind text and bars (BGR)


@lru_cache(maxsize=16)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        path = resources.files('matplotlib') / 'mpl-data' / 'fonts' / 'ttf' / 'DejaVuSans.ttf'
        return ImageFont.truetype(str(path), size)
    except (OSError, ModuleNotFoundError):
        return ImageFont.load_default(size)


def hex_rgb(colour: str) -> tuple[int, int, int]:
    blue, green, red = materials.hex_to_bgr(colour)
    return red, green, blue


def shade(colour: str, amount: float) -> str:
    """``colour`` mixed towards white (amount > 0) or black (amount < 0)."""
    rgb = np.array(hex_rgb(colour), dtype=np.float64)
    target = 255.0 if amount > 0 else 0.0
    mixed = np.clip(np.round(rgb + (target - rgb) * abs(amount)), 0, 255).astype(int)
    return '#' + ''.join(f'{v:02x}' for v in mixed)


def layer_class_name(layer_class: int | str) -> str:
    """'mono', 'few', ... from a layer class number or name."""
    if isinstance(layer_class, str):
        return layer_class
    return materials.LAYER_CLASS_NAMES.get(int(layer_class), str(layer_class))


def flake_caption(material: str, layer_class: int | str, thickness_nm: float, thickness_nm_std: float,
                  compact: bool = False) -> str:
    """``hBN · few · 12.3 ± 0.4 nm`` (``hBN 12.3 nm`` when compact): the legend line of a flake picture."""
    name = materials.label(material)
    layer = layer_class_name(layer_class)
    if material == materials.UNKNOWN:
        return 'unknown material' if compact else 'unknown material (colour fits no calibration)'
    if thickness_nm <= 0:
        return name if compact else f'{name} · {layer}'
    digits = 2 if thickness_nm < 10 else 1
    if compact:
        return f'{name} {thickness_nm:.{digits}f} nm'
    return f'{name} · {layer} · {with_uncertainty(thickness_nm, thickness_nm_std, "nm", digits)}'


def nice_length(target: float) -> float:
    """The largest of 1, 2, 5 x 10^k not above ``target`` (> 0)."""
    exponent = math.floor(math.log10(target))
    for step in (5, 2, 1):
        value = step * 10.0 ** exponent
        if value <= target * (1 + 1e-9):
            return value
    return 10.0 ** exponent


def annotate(pixels: np.ndarray, metres_per_pixel: float | None, legend: Sequence[tuple[str, str]] = (),
             scale: float = 1.0) -> np.ndarray:
    """``pixels`` (BGR) with a scale bar at the bottom left and legend lines at the top left.

    ``legend`` holds (colour, text) pairs; ``scale`` enlarges text and bar for big pictures.
    No scale bar is drawn when the pixel size is unknown (the legend says so).
    """
    height, width = pixels.shape[:2]
    size = max(9, int(round(min(width, 900) / 30 * scale)))
    image = Image.fromarray(cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB))
    draw = ImageDraw.Draw(image, 'RGBA')
    text_font = font(size)
    pad = max(2, size // 4)
    lines = list(legend)
    if not metres_per_pixel or not math.isfinite(metres_per_pixel) or metres_per_pixel <= 0:
        lines.append(('#b0bec5', 'no pixel size: no scale bar'))
    y: float = pad                      # Pillow's text boxes may be fractional
    for colour, text in lines:
        line_font, text = fit_text(draw, text, size, width - 3 * pad - size - 4)
        box = draw.textbbox((0, 0), text, font=line_font)
        line_height = max(box[3] - box[1], size * 3 // 4)
        draw.rectangle((pad - 1, y - 1, pad + line_height + 4 + box[2] + pad, y + line_height + pad),
                       fill=(*BACKDROP[::-1], 190))
        draw.rectangle((pad + 1, y + 1, pad + line_height - 1, y + line_height - 1), fill=hex_rgb(colour))
        draw.text((pad + line_height + 4, y - box[1]), text, fill=(240, 240, 240), font=line_font)
        y += line_height + pad + 2
    if metres_per_pixel and math.isfinite(metres_per_pixel) and metres_per_pixel > 0:
        length = nice_length(width * BAR_FRACTION * metres_per_pixel)
        bar = max(1, int(round(length / metres_per_pixel)))
        label = length_label(length)
        box = draw.textbbox((0, 0), label, font=text_font)
        bar_height = max(3, size // 3)
        left, bottom = pad + 2, height - pad - 2
        top = bottom - bar_height - (box[3] - box[1]) - pad
        draw.rectangle((left - pad, top - pad, left + max(bar, box[2]) + pad, bottom + pad // 2),
                       fill=(*BACKDROP[::-1], 190))
        draw.rectangle((left, bottom - bar_height, left + bar - 1, bottom), fill=(255, 255, 255))
        draw.text((left + max(0, (bar - box[2]) // 2), top - box[1]), label, fill=(255, 255, 255), font=text_font)
    return cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR)


def fit_text(draw: ImageDraw.ImageDraw, text: str, size: int,
             room: int) -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, str]:
    """The font (no smaller than 8 px) and text that fit ``room`` pixels; the text is cut with '…' if need be."""
    while size > 8 and draw.textlength(text, font=font(size)) > room:
        size -= 1
    text_font = font(size)
    if draw.textlength(text, font=text_font) > room:
        while len(text) > 1 and draw.textlength(text + '…', font=text_font) > room:
            text = text[:-1]
        text += '…'
    return text_font, text


def draw_outline(pixels: np.ndarray, points: np.ndarray, colour: str, thickness: int = 1) -> None:
    if len(points) >= 3:
        cv2.polylines(pixels, [np.round(points).astype(np.int32)], True, materials.hex_to_bgr(colour), thickness,
                      cv2.LINE_AA)


def encode_png(pixels: np.ndarray) -> bytes:
    ok, data = cv2.imencode('.png', pixels)
    if not ok:
        raise ValueError('could not encode the image')
    return data.tobytes()


def window(pixels: np.ndarray, centre: tuple[float, float], half: float) -> tuple[np.ndarray, int, int] | None:
    """A square of side 2*half around ``centre`` (pixels), padded black outside; with its left, top."""
    left, top = int(math.floor(centre[0] - half)), int(math.floor(centre[1] - half))
    side = max(1, int(math.ceil(2 * half)))
    height, width = pixels.shape[:2]
    if left >= width or top >= height or left + side <= 0 or top + side <= 0:
        return None
    canvas = np.zeros((side, side, 3), np.uint8)
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + side, width), min(top + side, height)
    canvas[y0 - top:y1 - top, x0 - left:x1 - left] = pixels[y0:y1, x0:x1]
    return canvas, left, top


def flake_window(pixels: np.ndarray, contour: Sequence[tuple[float, float]], centre: tuple[float, float],
                 to_pixels: Affine2D, metres_per_pixel: float, colour: str, legend: Sequence[tuple[str, str]],
                 margin: float = 2.0, out_size: int | None = None, min_half: float = 12.0,
                 min_display: int = 0) -> np.ndarray | None:
    """The picture around a flake with its outline, a scale bar and the legend.

    ``out_size`` resamples the square to that many pixels (thumbnails); None keeps the
    picture's own pixels (full resolution), each repeated as a block of whole pixels
    when the cut-out is smaller than ``min_display`` (never interpolated).
    """
    points = to_pixels.apply_points(np.asarray(contour or [centre], dtype=np.float64).reshape(-1, 2))
    cu, cv_ = to_pixels.apply(*centre)
    half = max(float(np.abs(points - [cu, cv_]).max()) * margin, min_half)
    cut = window(pixels, (cu, cv_), half)
    if cut is None:
        return None
    canvas, left, top = cut
    scale = 1.0
    if out_size is not None and out_size != canvas.shape[0]:
        scale = out_size / canvas.shape[0]
        canvas = cv2.resize(canvas, (out_size, out_size),
                            interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA)
    elif out_size is None and canvas.shape[0] < min_display:
        scale = float(math.ceil(min_display / canvas.shape[0]))
        canvas = cv2.resize(canvas, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    draw_outline(canvas, (points - [left, top]) * scale, colour, 1 if canvas.shape[0] < 300 else 2)
    return annotate(canvas, metres_per_pixel / scale, legend)


def outline_picture(contour: Sequence[tuple[float, float]], size: int, colour: str,
                    legend: Sequence[tuple[str, str]]) -> np.ndarray:
    """A dark square with the outline scaled to fit, its scale bar and legend (when no image is kept)."""
    canvas = np.full((size, size, 3), 24, np.uint8)
    points = np.asarray(contour, dtype=np.float64).reshape(-1, 2)
    if len(points) < 3:
        return annotate(canvas, None, legend)
    low, high = points.min(axis=0), points.max(axis=0)
    metres_per_pixel = max(float((high - low).max()), 1e-12) / (size * 0.6)
    centre = (low + high) / 2
    pixels = (points - centre) / metres_per_pixel * [1, -1] + size / 2
    bgr = materials.hex_to_bgr(colour)
    cv2.fillPoly(canvas, [np.round(pixels).astype(np.int32)], tuple(c // 2 for c in bgr), cv2.LINE_AA)
    draw_outline(canvas, pixels, colour)
    return annotate(canvas, metres_per_pixel, legend)


LAYER_MARKER_WIDTH = {'unknown': 1, 'mono': 3, 'few': 2, 'thick': 2, 'bulk': 1}
LAYER_WIDTH_LEGEND = 'outline width: mono 3 px, few and thick 2 px, bulk 1 px'


class OutlinedFlake(Protocol):
    """What a mosaic reads of a flake (the registry's records and the report's flakes have it)."""

    @property
    def material(self) -> str: ...
    @property
    def layer_class(self) -> int | str: ...
    @property
    def x(self) -> float: ...               # wafer frame [m]
    @property
    def y(self) -> float: ...
    @property
    def contour(self) -> Sequence[tuple[float, float]]: ...   # outline, wafer frame [m]


def annotated_mosaic(pixels: np.ndarray, to_mosaic: Affine2D, metres_per_pixel: float,
                     flakes: Iterable[OutlinedFlake], max_side: int = 4000) -> np.ndarray:
    """A scan mosaic with every flake's outline in its material colour, a scale bar and a legend."""
    height, width = pixels.shape[:2]
    factor = min(1.0, max_side / max(height, width))
    canvas = pixels if factor == 1.0 else cv2.resize(pixels, (int(width * factor), int(height * factor)),
                                                     interpolation=cv2.INTER_AREA)
    canvas = canvas.copy()
    present: dict[str, None] = {}
    for flake in flakes:
        present[flake.material] = None
        contour = flake.contour or [(flake.x, flake.y)]
        points = to_mosaic.apply_points(np.asarray(contour, dtype=np.float64).reshape(-1, 2)) * factor
        if len(points) >= 3:
            draw_outline(canvas, points, materials.colour(flake.material),
                         LAYER_MARKER_WIDTH.get(layer_class_name(flake.layer_class), 1))
        else:
            cv2.circle(canvas, tuple(np.round(points[0]).astype(int)), 3, materials.colour_bgr(flake.material), 1)
    legend = [(materials.colour(name), materials.label(name)) for name in present]
    legend.append(('#ffffff', LAYER_WIDTH_LEGEND))
    return annotate(canvas, metres_per_pixel / factor, legend, scale=1.4)
