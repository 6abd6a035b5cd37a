"""Report files of one analysis: colour-coded overlay PNG (Yang et al. (2024), Fig. 6), per-cell CSV,
summary JSON (material, detector, lattice and calibration measured, counts, concentrations, warnings)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np

from . import CLASS_COLOURS
from .analyze import DefectAnalysis
from .calibrate import MASK_REASONS

MASKED_COLOUR_BGR = (60, 60, 60)


def overlay(image: np.ndarray, analysis: DefectAnalysis, perfect_outline: bool = True) -> np.ndarray:
    """8-bit BGR picture of the image with every unit cell outlined in its class colour (masked cells dark)."""
    pixels = np.asarray(image)
    if pixels.ndim == 3:
        pixels = pixels[..., :3].astype(np.float32).mean(axis=2)
    low, high = np.percentile(pixels[::max(pixels.shape[0] // 1024, 1), ::max(pixels.shape[1] // 1024, 1)],
                              [0.5, 99.8])
    grey = np.clip((pixels.astype(np.float32) - low) / max(float(high - low), 1e-6) * 255, 0, 255).astype(np.uint8)
    picture = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    thickness = max(1, round(min(grey.shape) / 700))
    analysed = analysis.analysed
    for corners, k, ok in zip(analysis.corners, analysis.classes, analysed):
        polygon = np.rint(corners).astype(np.int32).reshape(-1, 1, 2)
        if not ok:
            cv2.polylines(picture, [polygon], True, MASKED_COLOUR_BGR, thickness)
            continue
        if k == 0 and not perfect_outline:
            continue
        r, g, b = CLASS_COLOURS[int(k)]
        cv2.polylines(picture, [polygon], True, (b, g, r), thickness if k == 0 else 2 * thickness)
    return picture


def cell_rows(analysis: DefectAnalysis) -> list[dict]:
    names = analysis.class_names
    rows = []
    boxes = analysis.boxes
    for index, (centre, box, k, p, mask) in enumerate(zip(analysis.centres, boxes, analysis.classes,
                                                           analysis.probabilities, analysis.mask)):
        row = {'cell': index, 'analysed': int(mask == 0), 'mask_reason': MASK_REASONS[int(mask)],
               'class_id': int(k), 'class': names[int(k)], 'confidence': float(p[k]),
               'x_min_px': float(box[0]), 'y_min_px': float(box[1]), 'x_max_px': float(box[2]),
               'y_max_px': float(box[3]), 'x_m': float(centre[0]) * analysis.pixel_size,
               'y_m': float(centre[1]) * analysis.pixel_size,
               'metal_level': float(analysis.metal_level[index]),
               'chalcogen_level': float(analysis.chalcogen_level[index])}
        row.update({f'p_{name}': float(p[j]) for j, name in enumerate(names)})
        rows.append(row)
    return rows


def write_report(directory: Path, image: np.ndarray, analysis: DefectAnalysis, image_id: str = 'image',
                 source: dict | None = None) -> list[Path]:
    """Write ``<id>_overlay.png``, ``<id>_cells.csv`` and ``<id>_report.json``; return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    overlay_path = directory / f'{image_id}_overlay.png'
    csv_path = directory / f'{image_id}_cells.csv'
    json_path = directory / f'{image_id}_report.json'
    if not cv2.imwrite(str(overlay_path), overlay(image, analysis)):
        raise ValueError(f'cannot write {overlay_path}')
    rows = cell_rows(analysis)
    fields = list(rows[0]) if rows else ['cell', 'analysed', 'mask_reason', 'class_id', 'class', 'confidence']
    with open(csv_path, 'w', newline='') as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    summary = {'image_id': image_id, **analysis.summary(), 'source': source or {},
               'colours_rgb': dict(zip(analysis.class_names, CLASS_COLOURS))}
    tmp = json_path.with_suffix('.json.tmp')
    tmp.write_text(json.dumps(summary, indent=2, default=_json_default) + '\n')
    tmp.replace(json_path)
    return [overlay_path, csv_path, json_path]


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f'{type(value).__name__} is not JSON serialisable')
