"""The scan report: an HTML page with the annotated mosaic, a flake gallery and the metrics."""

from __future__ import annotations

from dataclasses import dataclass
import html
import json
import math
from pathlib import Path

import cv2
import numpy as np

from flake_core import materials
from flake_core.geometry import Affine2D
from flake_scanner.demo.metrics import LAYER_CLASSES, ScanScore

TRUTH_CAPTION = ('Against the simulator\'s ground truth: true flakes of 1-40 layers and at least 20 um^2 lying '
                 'wholly inside the region (bulk crystals are not hunted, so not counted).')


@dataclass(frozen=True)
class ReportFlake:
    flake_id: str
    material: str
    layer_class: str
    layers: float
    thickness_nm: float
    thickness_nm_std: float
    area: float  # [m^2]
    score: float
    centre: tuple[float, float]  # wafer frame [m]
    tile_index: int
    bbox: tuple[int, int, int, int]  # x, y, width, height in the source frame [px]
    revisit_image: str = ''


def annotate_mosaic(mosaic: np.ndarray, wafer_to_mosaic: Affine2D, flakes: list[ReportFlake]) -> np.ndarray:
    out = mosaic.copy()
    for flake in flakes:
        u, v = wafer_to_mosaic.apply(*flake.centre)
        radius = max(4, int(math.sqrt(flake.area / math.pi) * abs(wafer_to_mosaic.scale)) + 3)
        colour = materials.colour_bgr(flake.material)
        thickness = 2 if flake.layer_class in ('mono', 'few') else 1
        cv2.circle(out, (int(round(u)), int(round(v))), radius, colour, thickness, cv2.LINE_AA)
    return out


def thumbnail(frame: np.ndarray, bbox: tuple[int, int, int, int], size: int = 160) -> np.ndarray:
    x, y, w, h = bbox
    margin = max(w, h) // 2 + 8
    height, width = frame.shape[:2]
    x0, y0 = max(0, x - margin), max(0, y - margin)
    x1, y1 = min(width, x + w + margin), min(height, y + h + margin)
    crop = frame[y0:y1, x0:x1].copy()
    cv2.rectangle(crop, (x - x0, y - y0), (x - x0 + w, y - y0 + h), (0, 220, 255), 1)
    scale = size / max(crop.shape[:2])
    return cv2.resize(crop, (max(1, int(crop.shape[1] * scale)), max(1, int(crop.shape[0] * scale))),
                      interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def _fmt(value: float, digits: int = 2) -> str:
    return '-' if value is None or (isinstance(value, float) and math.isnan(value)) else f'{value:.{digits}f}'


def _finite(value):
    """JSON has no NaN: undefined ratios become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def summary_rows(flakes: list[ReportFlake]) -> list[tuple[str, dict[str, int]]]:
    rows = []
    for material in sorted({f.material for f in flakes}):
        counts = {c: sum(1 for f in flakes if f.material == material and f.layer_class == c) for c in LAYER_CLASSES}
        rows.append((material, counts))
    return rows


def metrics_table(score: ScanScore) -> list[dict]:
    rows = []
    for material in sorted(score.per_material):
        s = score.per_material[material]
        rows.append({'material': material, 'found': s.found, 'true': s.true, 'precision': s.precision,
                     'recall': s.recall, 'thin found': f'{s.thin_matched}/{s.thin_true}',
                     'layer_class_accuracy': s.layer_class_correct / s.matched_found if s.matched_found else
                     float('nan')})
    total = score.total()
    rows.append({'material': 'all', 'found': total.found, 'true': total.true, 'precision': total.precision,
                 'recall': total.recall, 'thin found': f'{total.thin_matched}/{total.thin_true}',
                 'layer_class_accuracy': total.layer_class_correct / total.matched_found if total.matched_found
                 else float('nan')})
    return rows


def text_summary(flakes: list[ReportFlake], score: ScanScore | None, timings: dict) -> str:
    """The plain-text tables printed at the end of a scan."""
    lines = ['Flakes in the registry by material and layer class:', '',
             '| material | ' + ' | '.join(LAYER_CLASSES) + ' | total |',
             '|---' * (len(LAYER_CLASSES) + 2) + '|']
    for material, counts in summary_rows(flakes):
        lines.append(f'| {material} | ' + ' | '.join(str(counts[c]) for c in LAYER_CLASSES)
                     + f' | {sum(counts.values())} |')
    if score is not None:
        lines += ['', TRUTH_CAPTION, '',
                  '| material | found | true | precision | recall | thin (1-10 layers) found | layer class acc. |',
                  '|---|---|---|---|---|---|---|']
        for row in metrics_table(score):
            lines.append(f'| {row["material"]} | {row["found"]} | {row["true"]} | {_fmt(row["precision"])} | '
                         f'{_fmt(row["recall"])} | {row["thin found"]} | {_fmt(row["layer_class_accuracy"])} |')
    lines += ['', '| timing | value |', '|---|---|']
    for key, value in timings.items():
        lines.append(f'| {key} | {value} |')
    return '\n'.join(lines)


def write_report(folder: Path, flakes: list[ReportFlake], frames_dir: Path | None, mosaic_path: Path | None,
                 score: ScanScore | None, timings: dict, title: str = 'Flake scan report') -> Path:
    """Write index.html, the annotated mosaic, thumbnails and metrics.json into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    thumbs = folder / 'thumbnails'
    thumbs.mkdir(exist_ok=True)
    mosaic_html = '<p>No mosaic was written for this scan.</p>'
    if mosaic_path is not None and mosaic_path.exists():
        meta = json.loads(mosaic_path.with_suffix('.json').read_text())
        mosaic = cv2.imread(str(mosaic_path))
        annotated = annotate_mosaic(mosaic, Affine2D.from_list(meta['wafer_to_mosaic']), flakes)
        cv2.imwrite(str(folder / 'mosaic.png'), annotated)
        mosaic_html = '<img class="mosaic" src="mosaic.png" alt="mosaic of the scanned region">'
    cards = []
    ordered = sorted(flakes, key=lambda f: (LAYER_CLASSES.index(f.layer_class) if f.layer_class in LAYER_CLASSES
                                            else 9, -f.score))
    frame_cache: dict[int, np.ndarray | None] = {}
    for flake in ordered:
        image_name = ''
        if frames_dir is not None:
            if flake.tile_index not in frame_cache:
                path = frames_dir / f'{flake.tile_index:05d}.jpg'
                frame_cache[flake.tile_index] = cv2.imread(str(path)) if path.exists() else None
            frame = frame_cache[flake.tile_index]
            if frame is not None and flake.bbox[2] > 0:
                image_name = f'thumbnails/{flake.flake_id}.png'
                cv2.imwrite(str(folder / image_name), thumbnail(frame, flake.bbox))
        revisit = ''
        if flake.revisit_image and Path(flake.revisit_image).exists():
            name = f'thumbnails/{flake.flake_id}_revisit.png'
            image = cv2.imread(flake.revisit_image)
            if image is not None:
                scale = 160 / max(image.shape[:2])
                cv2.imwrite(str(folder / name), cv2.resize(image, None, fx=scale, fy=scale,
                                                            interpolation=cv2.INTER_AREA))
                revisit = f'<img src="{name}" alt="revisit" title="high-magnification revisit">'
        colour = materials.colour(flake.material)
        picture = f'<img src="{image_name}" alt="{html.escape(flake.flake_id)}">' if image_name else ''
        cards.append(
            f'<div class="card"><div class="pics">{picture}{revisit}</div>'
            f'<b style="color:{colour}">{html.escape(flake.material)}</b> {html.escape(flake.layer_class)}<br>'
            f'{flake.layers:.1f} layers, {flake.thickness_nm:.1f} &plusmn; {flake.thickness_nm_std:.1f} nm<br>'
            f'{flake.area * 1e12:.0f} &micro;m&sup2;, score {flake.score:.2f}<br>'
            f'<small>{html.escape(flake.flake_id)} at ({flake.centre[0] * 1e3:.3f}, {flake.centre[1] * 1e3:.3f}) mm'
            f'</small></div>')
    legend = ' '.join(f'<span style="color:{materials.colour(m)}">&#9679; {materials.label(m)}</span>'
                      for m in materials.MATERIAL_NAMES)
    metrics_html = ''
    if score is not None:
        rows = ''.join(f'<tr><td>{r["material"]}</td><td>{r["found"]}</td><td>{r["true"]}</td>'
                       f'<td>{_fmt(r["precision"])}</td><td>{_fmt(r["recall"])}</td><td>{r["thin found"]}</td>'
                       f'<td>{_fmt(r["layer_class_accuracy"])}</td></tr>' for r in metrics_table(score))
        metrics_html = (f'<h2>Against ground truth</h2><p>{html.escape(TRUTH_CAPTION)}</p>'
                        '<table><tr><th>material</th><th>found</th><th>true</th><th>precision</th><th>recall</th>'
                        f'<th>thin (1-10 layers) found</th><th>layer class acc.</th></tr>{rows}</table>')
    counts = ''.join(f'<tr><td>{m}</td>' + ''.join(f'<td>{c[k]}</td>' for k in LAYER_CLASSES)
                     + f'<td>{sum(c.values())}</td></tr>' for m, c in summary_rows(flakes))
    timing_rows = ''.join(f'<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>'
                          for k, v in timings.items())
    page = f'''<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}} td:first-child{{text-align:left}}
.mosaic{{width:900px;max-width:100%;border:1px solid #888}}
.gallery{{display:flex;flex-wrap:wrap;gap:12px}}
.card{{width:340px;border:1px solid #ddd;padding:6px;font-size:13px}} .pics img{{margin-right:4px}}</style>
</head><body><h1>{html.escape(title)}</h1>
<h2>Mosaic</h2><p>{legend} (thick rings: mono and few layers)</p>{mosaic_html}
<h2>Flakes by material and layer class</h2><table><tr><th>material</th>
{''.join(f"<th>{c}</th>" for c in LAYER_CLASSES)}<th>total</th></tr>{counts}</table>
{metrics_html}<h2>Timings</h2><table>{timing_rows}</table>
<h2>Gallery ({len(flakes)} flakes, thinnest first)</h2><div class="gallery">{''.join(cards)}</div>
</body></html>'''
    (folder / 'index.html').write_text(page)
    metrics = {'timings': timings, 'flakes': len(flakes),
               'by_class': {m: c for m, c in summary_rows(flakes)},
               'metrics': metrics_table(score) if score is not None else None}
    (folder / 'metrics.json').write_text(json.dumps(_finite(metrics), indent=1))
    return folder / 'index.html'
