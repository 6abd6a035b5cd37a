"""Report files of one analysis: colour-coded overlay PNG (seed 003 Fig. 6), per-cell CSV, summary JSON."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np

from . import CLASS_COLOURS, CLASS_NAMES
from .analyze import DefectAnalysis, InvalidImageError


def load_image(path: Path) -> np.ndarray:
    """Read a PNG/TIFF/JPEG (8 or 16 bit) or a .npy array; clear errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'no such image file: {path}')
    if path.stat().st_size == 0:
        raise InvalidImageError(f'{path} is empty')
    if path.suffix.lower() == '.npy':
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as error:
            raise InvalidImageError(f'{path} is not a numeric .npy array: {error}') from None
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise InvalidImageError(f'{path} is not a readable image (PNG, TIFF, JPEG or .npy)')
    return image


def save_image(path: Path, image: np.ndarray) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == '.npy':
        np.save(path, image)
    elif not cv2.imwrite(str(path), image):
        raise ValueError(f'cannot write an image to {path}')


def overlay(image: np.ndarray, analysis: DefectAnalysis, perfect_outline: bool = True) -> np.ndarray:
    """8-bit BGR picture of the image with every unit cell boxed in its class colour."""
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.ndim == 3:
        pixels = pixels[..., :3].mean(axis=2)
    low, high = np.percentile(pixels, [0.5, 99.8])
    grey = np.clip((pixels - low) / max(float(high - low), 1e-6) * 255, 0, 255).astype(np.uint8)
    picture = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    thickness = max(1, round(min(grey.shape) / 700))
    for box, k in zip(analysis.boxes, analysis.classes):
        if k == 0 and not perfect_outline:
            continue
        r, g, b = CLASS_COLOURS[int(k)]
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        cv2.rectangle(picture, (x0, y0), (x1, y1), (b, g, r), thickness if k == 0 else 2 * thickness)
    return picture


def cell_rows(analysis: DefectAnalysis) -> list[dict]:
    rows = []
    for index, (box, k, p) in enumerate(zip(analysis.boxes, analysis.classes, analysis.probabilities)):
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        row = {'cell': index, 'class_id': int(k), 'class': CLASS_NAMES[int(k)], 'confidence': float(p[k]),
               'x_min_px': float(box[0]), 'y_min_px': float(box[1]), 'x_max_px': float(box[2]),
               'y_max_px': float(box[3]), 'x_m': cx * analysis.pixel_size, 'y_m': cy * analysis.pixel_size}
        row.update({f'p_{name}': float(p[j]) for j, name in enumerate(CLASS_NAMES)})
        rows.append(row)
    return rows


def write_report(directory: Path, image: np.ndarray, analysis: DefectAnalysis, image_id: str = 'image') -> list[Path]:
    """Write ``<id>_overlay.png``, ``<id>_cells.csv`` and ``<id>_report.json``; return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    overlay_path = directory / f'{image_id}_overlay.png'
    csv_path = directory / f'{image_id}_cells.csv'
    json_path = directory / f'{image_id}_report.json'
    save_image(overlay_path, overlay(image, analysis))
    rows = cell_rows(analysis)
    fields = list(rows[0]) if rows else ['cell', 'class_id', 'class', 'confidence']
    with open(csv_path, 'w', newline='') as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    summary = {'image_id': image_id, **analysis.summary(), 'colours_rgb': dict(zip(CLASS_NAMES, CLASS_COLOURS))}
    json_path.write_text(json.dumps(summary, indent=2) + '\n')
    return [overlay_path, csv_path, json_path]
