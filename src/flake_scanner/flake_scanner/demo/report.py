"""The scan report: an HTML page that leads with the thin flakes found, then the annotated mosaic,
the metrics, the thickness and area distributions and a gallery.

Every picture carries a scale bar and a legend (``flake_core.drawing``); people read um, um^2,
nm and local time; a thickness shows its standard deviation only when one was estimated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
import html
import json
import math
from pathlib import Path

import cv2
import numpy as np

from flake_core import drawing, materials
from flake_core.geometry import Affine2D
from flake_core.units import UM, UM2, local_time, with_uncertainty
from flake_scanner.demo.metrics import LAYER_CLASSES, THIN_CLASSES, ScanScore

TRUTH_CAPTION = ('Against the simulator\'s ground truth: true flakes of 1-40 layers and at least 20 µm² lying '
                 'wholly inside the region (bulk crystals are not hunted, so not counted). A monolayer counts as '
                 'found when a registry flake on it says mono of its material, a thin flake (1-10 layers) when one '
                 'says mono or few of its material.')
THUMBNAIL_PX = 220
METRIC_COLUMNS = ('material', 'found', 'true', 'precision', 'recall', 'monolayers called mono', 'mono recall',
                  'thin called thin', 'thin recall', 'layer class acc.')


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
    contour: tuple[tuple[float, float], ...] = ()  # outline, wafer frame [m]
    revisit_pixel_size: float = 0.0  # [m/px] of the revisit image
    revisit_objective: str = '50x'

    @property
    def x(self) -> float:
        return self.centre[0]

    @property
    def y(self) -> float:
        return self.centre[1]

    def caption(self, compact: bool = False) -> str:
        return drawing.flake_caption(self.material, self.layer_class, self.thickness_nm, self.thickness_nm_std,
                                     compact)


@dataclass(frozen=True)
class ScanFrameFile:
    """A frame of the scan as kept on disk, with its pixel -> wafer map and size [px]."""

    path: Path
    pixel_to_wafer: Affine2D
    width: int = 0
    height: int = 0

    def margin_to(self, x: float, y: float) -> float:
        """How far inside this frame the wafer point (x, y) lies [px]; negative outside (inf: size unknown)."""
        if not self.width or not self.height:
            return math.inf
        u, v = self.pixel_to_wafer.inverse().apply(x, y)
        return min(u, v, self.width - 1 - u, self.height - 1 - v)


def layer_order(flake: ReportFlake) -> tuple:
    """Thinnest first: mono, few, thick, bulk, then by layer count and larger first."""
    rank = LAYER_CLASSES.index(flake.layer_class) if flake.layer_class in LAYER_CLASSES else len(LAYER_CLASSES)
    layers = flake.layers if flake.layers > 0 and math.isfinite(flake.layers) else math.inf
    return rank, layers, -flake.area, flake.flake_id


def annotate_mosaic(mosaic: np.ndarray, wafer_to_mosaic: Affine2D, flakes: Sequence[ReportFlake],
                    metres_per_pixel: float | None = None) -> np.ndarray:
    """The mosaic with every flake's outline in its material's colour, a scale bar and a legend."""
    scale = metres_per_pixel or 1.0 / abs(wafer_to_mosaic.scale)
    return drawing.annotated_mosaic(mosaic, wafer_to_mosaic, scale, flakes)


def thumbnail(frame: np.ndarray, flake: ReportFlake, pixel_to_wafer: Affine2D, size: int = THUMBNAIL_PX,
              box_in_frame: bool = True) -> np.ndarray | None:
    """The flake in a scan frame: outline (or, without one, its pixel box when ``box_in_frame``),
    scale bar and its caption."""
    colour = materials.colour(flake.material)
    contour = flake.contour
    if not contour and box_in_frame and flake.bbox[2] > 0:
        x, y, w, h = flake.bbox
        corners = np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], np.float64)
        contour = tuple(map(tuple, pixel_to_wafer.apply_points(corners)))
    return drawing.flake_window(frame, contour, flake.centre, pixel_to_wafer.inverse(), pixel_to_wafer.scale,
                                colour, [(colour, flake.caption(compact=True))], out_size=size)


def revisit_thumbnail(image: np.ndarray, flake: ReportFlake, size: int = THUMBNAIL_PX) -> np.ndarray:
    """The middle of the high-magnification revisit (the capture is centred on the flake): a square
    four times the flake's size, with its scale bar (when its pixel size is known) and caption."""
    height, width = image.shape[:2]
    side = min(height, width)
    if flake.revisit_pixel_size > 0 and flake.area > 0:
        side = int(min(side, max(4 * math.sqrt(flake.area) / flake.revisit_pixel_size, 160)))
    top, left = (height - side) // 2, (width - side) // 2
    crop = image[top:top + side, left:left + side]
    scale = size / side
    small = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    pixel = flake.revisit_pixel_size / scale if flake.revisit_pixel_size > 0 else None
    colour = materials.colour(flake.material)
    return drawing.annotate(small, pixel, [(colour, f'{flake.revisit_objective} revisit: '
                                                    f'{flake.caption(compact=True)}')])


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


def summary_rows(flakes: Sequence[ReportFlake]) -> list[tuple[str, dict[str, int]]]:
    rows = []
    for material in sorted({f.material for f in flakes}):
        counts = {c: sum(1 for f in flakes if f.material == material and f.layer_class == c) for c in LAYER_CLASSES}
        rows.append((material, counts))
    return rows


def _metric_row(material: str, s) -> dict:
    return {'material': material, 'found': s.found, 'true': s.true, 'precision': s.precision, 'recall': s.recall,
            'monolayers called mono': f'{s.mono_right}/{s.mono_true}', 'mono recall': s.mono_recall,
            'thin called thin': f'{s.thin_right}/{s.thin_true}', 'thin recall': s.thin_recall,
            'layer class acc.': s.layer_class_correct / s.matched_found if s.matched_found else float('nan'),
            # Kept for readers of earlier metrics.json files: thin targets located whatever their class.
            'thin found': f'{s.thin_matched}/{s.thin_true}'}


def metrics_table(score: ScanScore) -> list[dict]:
    rows = [_metric_row(material, score.per_material[material]) for material in sorted(score.per_material)
            if material != materials.UNKNOWN or score.per_material[material].found]
    rows.append(_metric_row('all', score.total()))
    return rows


def _cell(row: dict, column: str) -> str:
    value = row[column]
    return _fmt(value) if isinstance(value, float) else str(value)


def text_summary(flakes: Sequence[ReportFlake], score: ScanScore | None, timings: Mapping[str, object]) -> str:
    """The plain-text tables printed at the end of a scan."""
    lines = ['Flakes in the registry by material and layer class:', '',
             '| material | ' + ' | '.join(LAYER_CLASSES) + ' | total |',
             '|---' * (len(LAYER_CLASSES) + 2) + '|']
    for material, counts in summary_rows(flakes):
        lines.append(f'| {material} | ' + ' | '.join(str(counts[c]) for c in LAYER_CLASSES)
                     + f' | {sum(counts.values())} |')
    if score is not None:
        lines += ['', TRUTH_CAPTION, '', '| ' + ' | '.join(METRIC_COLUMNS) + ' |',
                  '|---' * len(METRIC_COLUMNS) + '|']
        for row in metrics_table(score):
            lines.append('| ' + ' | '.join(_cell(row, c) for c in METRIC_COLUMNS) + ' |')
    lines += ['', '| timing | value |', '|---|---|']
    for key, value in timings.items():
        lines.append(f'| {key} | {value} |')
    return '\n'.join(lines)


def distribution_plot(flakes: Sequence[ReportFlake], path: Path) -> bool:
    """Histograms of thickness [nm] and area [µm²] per material (log scales); False when there is nothing."""
    known = [f for f in flakes if f.material != materials.UNKNOWN]
    if not known:
        return False
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    figure, (thick_axes, area_axes) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    names = [m for m in materials.MATERIAL_NAMES if any(f.material == m for f in known)]
    thicknesses = [[f.thickness_nm for f in known if f.material == m and f.thickness_nm > 0] for m in names]
    areas = [[f.area / UM2 for f in known if f.material == m and f.area > 0] for m in names]
    colours = [materials.colour(m) for m in names]
    labels = [materials.label(m) for m in names]
    for axes, values, unit, low in ((thick_axes, thicknesses, 'thickness [nm]', 0.2),
                                    (area_axes, areas, 'area [µm²]', 1.0)):
        every = [v for group in values for v in group]
        if every:
            high = max(max(every), low * 10) * 1.2
            bins = np.geomspace(min(low, min(every)), high, 30)
            axes.hist([v for v in values], bins=bins, stacked=True, color=colours, label=labels)
            axes.set_xscale('log')
        axes.set(xlabel=unit, ylabel='flakes')
        axes.grid(alpha=0.3)
    thick_axes.set_title('thickness per material (mono ≈ 0.3-0.7 nm)')
    area_axes.set_title('area per material (≥ 20 µm²: what a lab picks up)')
    area_axes.axvline(20.0, color='#555555', linestyle='--', linewidth=1)
    thick_axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def _card(flake: ReportFlake, image_name: str, revisit_name: str) -> str:
    colour = materials.colour(flake.material)
    picture = f'<img src="{image_name}" alt="{html.escape(flake.flake_id)}">' if image_name else ''
    revisit = (f'<img src="{revisit_name}" alt="revisit" title="high-magnification revisit">'
               if revisit_name else '')
    layers = f'{flake.layers:.1f} layers, ' if flake.layers > 0 and math.isfinite(flake.layers) else ''
    thickness = (with_uncertainty(flake.thickness_nm, flake.thickness_nm_std, 'nm')
                 if flake.thickness_nm > 0 and math.isfinite(flake.thickness_nm) else 'thickness not estimated')
    return (f'<div class="card"><div class="pics">{picture}{revisit}</div>'
            f'<b style="color:{colour}">{html.escape(materials.label(flake.material))}</b> '
            f'{html.escape(flake.layer_class)}<br>{layers}{html.escape(thickness)}<br>'
            f'{flake.area / UM2:.0f} µm², score {flake.score:.2f}<br>'
            f'<small>{html.escape(flake.flake_id)} at ({flake.x / UM:.0f}, {flake.y / UM:.0f}) µm</small></div>')


def _thin_section(flakes: Sequence[ReportFlake], cards: Mapping[str, str]) -> str:
    rows, picks = [], []
    for material in materials.MATERIAL_NAMES:
        own = sorted((f for f in flakes if f.material == material and f.layer_class in THIN_CLASSES), key=layer_order)
        if not own and not any(f.material == material for f in flakes):
            continue
        mono = sum(f.layer_class == 'mono' for f in own)
        colour = materials.colour(material)
        rows.append(f'<tr><td><span style="color:{colour}">&#9632;</span> {html.escape(materials.label(material))}'
                    f'</td><td>{mono}</td><td>{len(own) - mono}</td></tr>')
        picks += own
    if not rows:
        return ''
    gallery = ''.join(cards[f.flake_id] for f in picks)
    return ('<h2>Thin flakes found</h2><p>Monolayers first, then few-layer flakes (2-10 layers), per material.</p>'
            '<table><tr><th>material</th><th>mono</th><th>few</th></tr>' + ''.join(rows) + '</table>'
            f'<div class="gallery">{gallery or "<p>No thin flakes in this scan.</p>"}</div>')


def write_report(folder: Path, flakes: Sequence[ReportFlake], frames_dir: Path | None, mosaic_path: Path | None,
                 score: ScanScore | None, timings: Mapping[str, object], title: str = 'Flake scan report',
                 frames: Mapping[int, ScanFrameFile] | None = None, created: float | None = None) -> Path:
    """Write index.html, the annotated mosaic, thumbnails, distributions.png and metrics.json into ``folder``.

    ``frames``: the scan's frames by tile index with their pixel -> wafer maps (thumbnails with
    outline and scale bar); without it, ``frames_dir/<tile:05d>.jpg`` are read and the flake's
    box is drawn, without a scale bar.
    """
    folder.mkdir(parents=True, exist_ok=True)
    thumbs = folder / 'thumbnails'
    thumbs.mkdir(exist_ok=True)
    mosaic_html = '<p>No mosaic was written for this scan.</p>'
    if mosaic_path is not None and mosaic_path.exists():
        meta = json.loads(mosaic_path.with_suffix('.json').read_text())
        mosaic = cv2.imread(str(mosaic_path))
        annotated = annotate_mosaic(mosaic, Affine2D.from_list(meta['wafer_to_mosaic']), flakes,
                                    meta.get('metres_per_pixel'))
        cv2.imwrite(str(folder / 'mosaic.png'), annotated)
        mosaic_html = '<img class="mosaic" src="mosaic.png" alt="mosaic of the scanned region">'
    ordered = sorted(flakes, key=layer_order)
    frame_cache: dict[int, np.ndarray | None] = {}

    def frame_of(flake: ReportFlake) -> tuple[np.ndarray | None, Affine2D | None, bool]:
        """The scan frame to cut the flake from, its map, and whether the flake's pixel box is in it.

        The frame of the flake's best sighting when that is a scan frame; else (a flake the
        revisits refined or found) the scan frame that holds its centre farthest from its edges.
        """
        tile_index, own = flake.tile_index, True
        if frames and (tile_index not in frames or frames[tile_index].margin_to(*flake.centre) < 0):
            own = False
            margin, tile_index = max(((frame.margin_to(*flake.centre), index) for index, frame in frames.items()),
                                     default=(-math.inf, -1))
            if margin < 0:
                return None, None, False
        known = (frames or {}).get(tile_index)
        if tile_index not in frame_cache:
            path = known.path if known is not None else (
                frames_dir / f'{tile_index:05d}.jpg' if frames_dir is not None else None)
            frame_cache[tile_index] = cv2.imread(str(path)) if path is not None and path.exists() else None
        return frame_cache[tile_index], known.pixel_to_wafer if known is not None else None, own

    cards: dict[str, str] = {}
    for flake in ordered:
        image_name = ''
        frame, to_wafer, own = frame_of(flake)
        if frame is not None and (to_wafer is not None or (own and flake.bbox[2] > 0)):
            picture = (thumbnail(frame, flake, to_wafer, box_in_frame=own) if to_wafer is not None
                       else _box_thumbnail(frame, flake))
            if picture is not None:
                image_name = f'thumbnails/{flake.flake_id}.png'
                cv2.imwrite(str(folder / image_name), picture)
        revisit_name = ''
        if flake.revisit_image and Path(flake.revisit_image).exists():
            image = cv2.imread(flake.revisit_image)
            if image is not None:
                revisit_name = f'thumbnails/{flake.flake_id}_revisit.png'
                cv2.imwrite(str(folder / revisit_name), revisit_thumbnail(image, flake))
        cards[flake.flake_id] = _card(flake, image_name, revisit_name)
    plot_html = ''
    if distribution_plot(flakes, folder / 'distributions.png'):
        plot_html = ('<h2>Thickness and area</h2><img class="plot" src="distributions.png" '
                     'alt="thickness and area distributions per material">')
    legend = ' '.join(f'<span style="color:{materials.colour(m)}">&#9632; {materials.label(m)}</span>'
                      for m in materials.MATERIAL_NAMES if any(f.material == m for f in flakes))
    metrics_html = ''
    if score is not None:
        head = ''.join(f'<th>{html.escape(c)}</th>' for c in METRIC_COLUMNS)
        rows = ''.join('<tr>' + ''.join(f'<td>{html.escape(_cell(r, c))}</td>' for c in METRIC_COLUMNS) + '</tr>'
                       for r in metrics_table(score))
        metrics_html = (f'<h2>Against ground truth</h2><p>{html.escape(TRUTH_CAPTION)}</p>'
                        f'<table><tr>{head}</tr>{rows}</table>')
    counts = ''.join(f'<tr><td>{m}</td>' + ''.join(f'<td>{c[k]}</td>' for k in LAYER_CLASSES)
                     + f'<td>{sum(c.values())}</td></tr>' for m, c in summary_rows(flakes))
    timing_rows = ''.join(f'<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>'
                          for k, v in timings.items())
    gallery = ''.join(cards[f.flake_id] for f in ordered)
    when = f'<p class="when">{html.escape(local_time(created))}</p>' if created else ''
    page = f'''<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}} td:first-child{{text-align:left}}
.mosaic{{width:900px;max-width:100%;border:1px solid #888}} .plot{{max-width:100%}}
.gallery{{display:flex;flex-wrap:wrap;gap:12px}} .when{{color:#666}}
.card{{width:460px;border:1px solid #ddd;padding:6px;font-size:13px}} .pics img{{margin-right:4px}}</style>
</head><body><h1>{html.escape(title)}</h1>{when}
{_thin_section(flakes, cards)}
<h2>Mosaic</h2><p>{legend} &nbsp; outlines: mono 3 px, few and thick 2 px, bulk 1 px</p>{mosaic_html}
<h2>Flakes by material and layer class</h2><table><tr><th>material</th>
{''.join(f"<th>{c}</th>" for c in LAYER_CLASSES)}<th>total</th></tr>{counts}</table>
{metrics_html}{plot_html}<h2>Timings</h2><table>{timing_rows}</table>
<h2>Gallery ({len(flakes)} flakes, thinnest first)</h2><div class="gallery">{gallery}</div>
</body></html>'''
    (folder / 'index.html').write_text(page)
    metrics = {'timings': dict(timings), 'flakes': len(flakes),
               'units': {'area': 'um^2', 'thickness': 'nm', 'position': 'um'},
               'by_class': {m: c for m, c in summary_rows(flakes)},
               'metrics': metrics_table(score) if score is not None else None}
    (folder / 'metrics.json').write_text(json.dumps(_finite(metrics), indent=1))
    return folder / 'index.html'


def _box_thumbnail(frame: np.ndarray, flake: ReportFlake, size: int = THUMBNAIL_PX) -> np.ndarray:
    """A cut-out around the flake's box when the frame's geometry is unknown (no scale bar then)."""
    x, y, w, h = flake.bbox
    margin = max(w, h) // 2 + 8
    height, width = frame.shape[:2]
    x0, y0 = max(0, x - margin), max(0, y - margin)
    x1, y1 = min(width, x + w + margin), min(height, y + h + margin)
    crop = frame[y0:y1, x0:x1].copy()
    colour = materials.colour(flake.material)
    cv2.rectangle(crop, (x - x0, y - y0), (x - x0 + w, y - y0 + h), materials.colour_bgr(flake.material), 1)
    scale = size / max(crop.shape[:2])
    crop = cv2.resize(crop, (max(1, int(crop.shape[1] * scale)), max(1, int(crop.shape[0] * scale))),
                      interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST)
    return drawing.annotate(crop, None, [(colour, flake.caption(compact=True))])
