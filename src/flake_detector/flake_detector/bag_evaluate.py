"""``flake-bag-eval``: run detector backends over the ScanFrames of a recorded scan.

A recorded scan keeps the raw frames; this re-runs any detector backend on them
offline and scores it against the simulator's ground truth, which travels beside
the bag as COCO (``<bag>/ground_truth.json``, written by ``flake-record
--ground-truth``, or any file given with ``--ground-truth``).

Frames are matched to ground-truth images by their pixel -> wafer maps: a frame
(or a tile cut from one by the tiler) lies inside a ground-truth image at an
integer pixel offset, and the truth is cropped to that window. Ground truth
without ``pixel_to_wafer`` is matched by order (n-th frame = n-th image).

Metrics come from flake_detector.evaluation (COCO AP per material, per-image
precision/recall, funnel, layer-class confusion); this module only turns a bag
into the ground truth and predictions that evaluation takes, and writes
``report.json`` (its ``units`` entry names what the numbers are in), ``report.md``,
precision-recall PNGs per backend and overlays of the first frames (each backend's
detections in their material's colour, the ground truth in white, a legend and a
scale bar). Materials are given as everywhere else: ``--materials graphene,hbn``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
import copy
from dataclasses import dataclass, field
import json
from pathlib import Path
import sys
import time

import numpy as np

from flake_core.materials import CONTAMINANT_CATEGORY_MIN, parse_materials
from flake_core.ros_image import image_to_numpy
from flake_scanner.bag.io import (
    GROUND_TRUTH_FILE,
    GROUND_TRUTH_TOPIC,
    STRING_TYPE,
    BagError,
    BagReader,
    NoFramesError,
    scan_frames,
)

# Offsets of a tile inside its source frame are whole pixels; allow for float rounding.
_PIXEL_TOLERANCE = 0.05
# What the numbers of report.json are in (COCO keeps boxes, masks and areas in frame pixels).
REPORT_UNITS = {'bbox': 'px', 'area': 'px', 'segmentation': 'px (COCO RLE)', 'detect_seconds': 's',
                'seconds_per_100_frames': 's', 'pixel_to_wafer': 'm per px (affine, row-major)',
                'timestamp_ns': 'ns since the epoch', 'score': '0..1', 'AP': '0..1', 'precision': '0..1',
                'recall': '0..1'}


class GroundTruthError(BagError):
    """Ground truth that is missing or does not fit the bag's frames."""


def find_ground_truth(bag: Path, explicit: str | Path | None = None) -> Path | None:
    """The COCO file to score against: ``explicit``, else ``<bag>/ground_truth.json``; None if neither."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise GroundTruthError(f'ground truth file {path} does not exist')
        return path
    folder = bag if bag.is_dir() else bag.parent
    candidate = folder / GROUND_TRUTH_FILE
    return candidate if candidate.is_file() else None


def _check_coco(coco, source: str) -> dict:
    if not isinstance(coco, dict):
        raise GroundTruthError(f'ground truth {source} is not a COCO object')
    missing = [k for k in ('images', 'annotations', 'categories') if k not in coco]
    if missing:
        raise GroundTruthError(f'ground truth {source} lacks COCO keys {missing}')
    return coco


def load_ground_truth(path: Path) -> dict:
    try:
        coco = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise GroundTruthError(f'ground truth {path} is not a readable COCO JSON file: {exc}') from exc
    return _check_coco(coco, str(path))


def merge_coco(parts: list[dict]) -> dict:
    """One COCO dict from several (e.g. one ground-truth message per frame), with fresh ids."""
    merged: dict = {'images': [], 'annotations': [], 'categories': []}
    known_categories = set()
    for part in parts:
        image_ids = {}
        for image in part['images']:
            image_ids[image['id']] = len(merged['images']) + 1
            merged['images'].append({**image, 'id': image_ids[image['id']]})
        for annotation in part['annotations']:
            merged['annotations'].append({**annotation, 'id': len(merged['annotations']) + 1,
                                          'image_id': image_ids[annotation['image_id']]})
        for category in part['categories']:
            if category['id'] not in known_categories:
                known_categories.add(category['id'])
                merged['categories'].append(category)
    return merged


def ground_truth_from_bag(reader: BagReader) -> dict | None:
    """The COCO ground truth carried on ``/scan/ground_truth`` (std_msgs/String JSON), merged; None if absent."""
    info = reader.topics.get(GROUND_TRUTH_TOPIC)
    if info is None:
        return None
    if info.msgtype != STRING_TYPE:
        raise GroundTruthError(f'bag {reader.path}: {GROUND_TRUTH_TOPIC} is {info.msgtype}, expected {STRING_TYPE}')
    parts = []
    for message in reader.messages([GROUND_TRUTH_TOPIC]):
        source = f'message on {GROUND_TRUTH_TOPIC} at t={message.timestamp} ns'
        try:
            parts.append(_check_coco(json.loads(reader.deserialize(message).data), source))
        except ValueError as exc:
            raise GroundTruthError(f'bag {reader.path}: {source} is not COCO JSON: {exc}') from exc
    return merge_coco(parts) if parts else None


def resolve_ground_truth(reader: BagReader, bag: Path, explicit: str | Path | None = None) -> dict:
    """``explicit`` file, else the file beside the bag, else the ground-truth topic in the bag."""
    path = find_ground_truth(bag, explicit)
    if path is not None:
        return load_ground_truth(path)
    coco = ground_truth_from_bag(reader)
    if coco is not None:
        return coco
    folder = bag if bag.is_dir() else bag.parent
    raise GroundTruthError(f'no ground truth for bag {bag}: neither {folder / GROUND_TRUTH_FILE} nor a '
                           f'{GROUND_TRUTH_TOPIC} topic (record with --ground-truth, or pass --ground-truth FILE)')


@dataclass
class TruthWindow:
    """Where a bag frame lies in a ground-truth image: image id and pixel offset."""

    image: dict
    du: int
    dv: int


@dataclass
class GroundTruthIndex:
    """Finds, for each frame of a bag, the ground-truth image and offset it was cut from."""

    coco: dict
    annotations_by_image: dict[int, list[dict]] = field(default_factory=dict)

    def __post_init__(self):
        for annotation in self.coco['annotations']:
            self.annotations_by_image.setdefault(annotation['image_id'], []).append(annotation)
        self.images = sorted(self.coco['images'], key=lambda image: image['id'])
        self.by_affine = all('pixel_to_wafer' in image for image in self.images)

    def locate(self, frame_index: int, pixel_to_wafer, width: int, height: int) -> TruthWindow | None:
        if not self.by_affine:
            if frame_index < len(self.images):
                image = self.images[frame_index]
                if (image.get('width'), image.get('height')) == (width, height):
                    return TruthWindow(image, 0, 0)
            return None
        frame = np.asarray(pixel_to_wafer, dtype=float).reshape(2, 3)
        for image in self.images:
            truth = np.asarray(image['pixel_to_wafer'], dtype=float).reshape(2, 3)
            linear = truth[:, :2]
            scale = np.abs(linear).max()
            if scale == 0 or np.abs(linear - frame[:, :2]).max() > 1e-6 * scale:
                continue
            du, dv = np.linalg.solve(linear, frame[:, 2] - truth[:, 2])
            iu, iv = round(du), round(dv)
            if abs(du - iu) > _PIXEL_TOLERANCE or abs(dv - iv) > _PIXEL_TOLERANCE:
                continue
            if 0 <= iu and 0 <= iv and iu + width <= image['width'] and iv + height <= image['height']:
                return TruthWindow(image, iu, iv)
        return None

    def annotations_in(self, window: TruthWindow, width: int, height: int) -> list[dict]:
        """The window's annotations in frame pixels (masks cropped, empty ones dropped)."""
        from pycocotools import mask as mask_utils

        whole = window.du == 0 and window.dv == 0 and (width, height) == (
            window.image['width'], window.image['height'])
        result = []
        for annotation in self.annotations_by_image.get(window.image['id'], []):
            if whole:
                result.append(copy.deepcopy(annotation))
                continue
            x, y, w, h = annotation['bbox']
            if x + w <= window.du or y + h <= window.dv or x >= window.du + width or y >= window.dv + height:
                continue
            full = mask_utils.decode(_as_rle(annotation['segmentation'], window.image))
            crop = np.ascontiguousarray(full[window.dv:window.dv + height, window.du:window.du + width])
            if not crop.any():
                continue
            rle = mask_utils.encode(np.asfortranarray(crop.astype(np.uint8)))
            rle['counts'] = rle['counts'].decode('ascii')
            cropped = copy.deepcopy(annotation)
            cropped['segmentation'] = rle
            cropped['area'] = float(crop.sum())
            cropped['bbox'] = [float(v) for v in mask_utils.toBbox(rle)]
            result.append(cropped)
        return result


def _as_rle(segmentation, image: dict):
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):  # polygons
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, image['height'], image['width']))
    if isinstance(segmentation.get('counts'), list):  # uncompressed RLE
        return mask_utils.frPyObjects(segmentation, *segmentation['size'])
    rle = dict(segmentation)
    if isinstance(rle['counts'], str):
        rle['counts'] = rle['counts'].encode('ascii')
    return rle


@dataclass
class BagFrame:
    """One frame of the bag ready for a detector, with its ground truth in frame pixels."""

    image_id: int
    timestamp: int
    scan_id: str
    tile_index: int
    pixels: np.ndarray
    pixel_to_wafer: list[float]
    annotations: list[dict]


def bag_frames(reader: BagReader, truth: GroundTruthIndex, topic: str | None = None,
               limit: int | None = None, strict: bool = True) -> Iterator[BagFrame]:
    """Scan frames of the bag with their ground truth, in order.

    High-magnification revisit captures are left out (the ground truth describes the
    scan grid). Frames outside the truth raise (``strict``) or are skipped.
    """
    position = 0
    for timestamp, frame in scan_frames(reader, topic):
        if frame.revisit:
            continue
        if limit is not None and position >= limit:
            return
        pixels = image_to_numpy(frame.image, 'bgr8')
        height, width = pixels.shape[:2]
        window = truth.locate(position, list(frame.pixel_to_wafer), width, height)
        position += 1
        if window is None:
            if strict:
                raise GroundTruthError(f'frame {position - 1} (scan {frame.scan_id!r}, tile {frame.tile_index}) '
                                       f'of {reader.path} lies in no ground-truth image')
            continue
        yield BagFrame(image_id=position, timestamp=timestamp, scan_id=frame.scan_id,
                       tile_index=int(frame.tile_index), pixels=pixels,
                       pixel_to_wafer=[float(v) for v in frame.pixel_to_wafer],
                       annotations=truth.annotations_in(window, width, height))


def _parse_backend(spec: str, materials: str | None = None) -> tuple[str, dict]:
    """'contrast' or 'contrast:oxide_nm=285,calibration=model' -> (name, params).

    Materials are given once for every contrast backend with ``--materials graphene,hbn``, the
    syntax of every command line (``materials``: comma-separated names).
    """
    name, _, rest = spec.partition(':')
    name = name.strip()
    params: dict = {}
    for item in filter(None, rest.split(',')):
        key, sep, value = item.partition('=')
        if not sep:
            raise ValueError(f'backend option {item!r} must look like key=value')
        if key.strip() == 'materials':
            raise ValueError(f'give materials with --materials (comma-separated, e.g. --materials graphene,hbn), '
                             f'not as an option of {name!r}')
        try:
            params[key.strip()] = json.loads(value)
        except ValueError:
            params[key.strip()] = value
    if materials and name == 'contrast':
        params['materials'] = materials
    return name, params


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='flake-bag-eval', description=__doc__.split('\n\n')[0])
    parser.add_argument('bag', help='rosbag2 directory or .mcap/.db3 file')
    parser.add_argument('--backends', default='contrast',
                        help='comma separated backends, each optionally name:key=value,... '
                             '(separate backends with ";" when they carry options)')
    parser.add_argument('--materials', default=None,
                        help='contrast backends: comma-separated materials to match, e.g. graphene,hbn')
    parser.add_argument('--overlays', type=int, default=8,
                        help='frames drawn per backend into overlays/<backend>/ (detections in their material\'s '
                             'colour, the ground truth in white, legend, scale bar); 0 = none')
    parser.add_argument('--ground-truth', default=None, help='COCO file (default: <bag>/ground_truth.json)')
    parser.add_argument('--topic', default=None, help='ScanFrame topic (default: /scan/tiles, /scan/frames)')
    parser.add_argument('--output', '-o', default=None, help='report folder (default: <bag>/evaluation)')
    parser.add_argument('--limit', type=int, default=None, help='evaluate only the first N frames')
    args = parser.parse_args(argv)
    separator = ';' if ';' in args.backends else ','
    try:
        materials = ','.join(parse_materials(args.materials)) if args.materials is not None else None
        backends = [_parse_backend(spec, materials) for spec in args.backends.split(separator) if spec.strip()]
        bag = Path(args.bag)
        output = Path(args.output) if args.output else (bag if bag.is_dir() else bag.parent) / 'evaluation'
        report = evaluate_bag(bag, backends, output, ground_truth=args.ground_truth, topic=args.topic,
                              limit=args.limit, progress=True, overlays=max(0, args.overlays))
    except (BagError, ValueError) as exc:
        print(f'flake-bag-eval: {exc}', file=sys.stderr)
        return 2
    print(markdown_report(report))
    print(f'report written to {output}')
    return 0


def ground_truth_for_frames(reader: BagReader, truth: GroundTruthIndex, topic: str | None,
                            limit: int | None) -> dict:
    """A COCO dict whose images are the bag's frames and whose annotations are in frame pixels."""
    images, annotations = [], []
    for frame in bag_frames(reader, truth, topic, limit):
        height, width = frame.pixels.shape[:2]
        images.append({'id': frame.image_id, 'width': width, 'height': height, 'scan_id': frame.scan_id,
                       'tile_index': frame.tile_index, 'timestamp_ns': frame.timestamp,
                       'pixel_to_wafer': frame.pixel_to_wafer})
        for annotation in frame.annotations:
            annotation['id'] = len(annotations) + 1
            annotation['image_id'] = frame.image_id
            annotations.append(annotation)
    return {'images': images, 'annotations': annotations, 'categories': truth.coco['categories']}


@dataclass
class BackendRun:
    predictions: list[dict]
    funnel: list[dict]
    frames: int
    detect_seconds: float


def run_backend(reader: BagReader, truth: GroundTruthIndex, name: str, params: dict,
                topic: str | None = None, limit: int | None = None, progress: bool = False,
                overlay_dir: Path | None = None, overlays: int = 0) -> BackendRun:
    """Run one backend over every frame of the bag and collect COCO predictions and its funnel;
    the first ``overlays`` frames are drawn into ``overlay_dir``."""
    from flake_detector.detection import make_detector
    from flake_detector.evaluation import detections_to_predictions

    detector = make_detector(name, **params)
    predictions: list[dict] = []
    funnel: dict[str, int] = {}
    frames = 0
    detect_seconds = 0.0
    for frame in bag_frames(reader, truth, topic, limit):
        start = time.perf_counter()
        result = detector.detect(frame.pixels)
        detect_seconds += time.perf_counter() - start
        height, width = frame.pixels.shape[:2]
        predictions += detections_to_predictions(frame.image_id, result.detections, height, width)
        if overlay_dir is not None and frames < overlays:
            write_overlay(overlay_dir / f'frame_{frame.image_id:05d}.png', frame, result.detections)
        for stage in result.funnel:
            funnel[stage.stage] = funnel.get(stage.stage, 0) + int(stage.remaining)
        frames += 1
        if progress and frames % 10 == 0:
            print(f'[{name}] {frames} frame(s), {len(predictions)} detection(s)', file=sys.stderr, flush=True)
    return BackendRun(predictions, [{'stage': k, 'remaining': v} for k, v in funnel.items()], frames,
                      detect_seconds)


def write_overlay(path: Path, frame: BagFrame, detections) -> None:
    """One frame with the backend's detections, its ground truth, a legend and a scale bar."""
    import cv2

    from flake_detector.cli import draw_overlay

    height, width = frame.pixels.shape[:2]
    truth = [_mask_of(annotation, height, width) for annotation in frame.annotations
             if annotation.get('category_id', 0) < CONTAMINANT_CATEGORY_MIN]
    pixel_size = float(np.hypot(frame.pixel_to_wafer[0], frame.pixel_to_wafer[3])) or None
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), draw_overlay(frame.pixels, detections, pixel_size, truth))


def _mask_of(annotation: dict, height: int, width: int) -> np.ndarray:
    from pycocotools import mask as mask_utils

    return mask_utils.decode(_as_rle(annotation['segmentation'], {'height': height, 'width': width})).astype(bool)


def precision_recall_curve(gt: dict, predictions: list[dict], material: str | None,
                           iou_threshold: float = 0.5) -> dict[str, list[float]]:
    """Flake-level precision and recall as the score threshold falls (mask IoU >= ``iou_threshold``).

    Uses the evaluation module's own truth selection and greedy matching, so the curve
    agrees with its AP; each prediction is a true positive when matched in its image.
    """
    from flake_detector.evaluation import match_image, select_predictions, select_truth

    truth = select_truth(gt, material)
    preds = select_predictions(predictions, material)
    sizes = {image['id']: (image['height'], image['width']) for image in gt['images']}
    truth_by_image: dict[int, list[dict]] = {}
    for annotation in truth:
        truth_by_image.setdefault(annotation['image_id'], []).append(annotation)
    preds_by_image: dict[int, list[dict]] = {}
    for prediction in preds:
        preds_by_image.setdefault(prediction['image_id'], []).append(prediction)
    scored: list[tuple[float, bool]] = []
    for image_id, image_preds in preds_by_image.items():
        height, width = sizes[image_id]
        matched = {k for _, k, _ in match_image(truth_by_image.get(image_id, []), image_preds, height, width,
                                                iou_threshold)}
        scored += [(float(p.get('score', 0.0)), k in matched) for k, p in enumerate(image_preds)]
    scored.sort(key=lambda item: -item[0])
    true_positives = np.cumsum([hit for _, hit in scored]) if scored else np.zeros(0)
    ranks = np.arange(1, len(scored) + 1)
    return {'score': [s for s, _ in scored],
            'precision': (true_positives / ranks).tolist() if scored else [],
            'recall': (true_positives / len(truth)).tolist() if scored and truth else [],
            'ground_truth': len(truth)}


def evaluate_bag(bag: Path, backends: list[tuple[str, dict]], output: Path | None,
                 ground_truth: str | Path | None = None, topic: str | None = None,
                 limit: int | None = None, progress: bool = False, overlays: int = 0) -> dict:
    """Run every backend over the bag's frames and score each; write the report when ``output``
    (with ``overlays`` frames drawn per backend into ``output/overlays/<backend>/``)."""
    from flake_detector.evaluation import evaluate

    if not backends:
        raise ValueError('no detector backend given')
    bag = Path(bag)
    with BagReader(bag) as reader:
        truth = GroundTruthIndex(resolve_ground_truth(reader, bag, ground_truth))
        gt = ground_truth_for_frames(reader, truth, topic, limit)
        if not gt['images']:
            raise NoFramesError(f'bag {bag}: no frames to evaluate')
        report: dict = {'bag': str(bag), 'frames': len(gt['images']),
                        'ground_truth_flakes': len(gt['annotations']), 'units': REPORT_UNITS, 'backends': {}}
        for number, (name, params) in enumerate(backends):
            label = name if not params else f'{name}({", ".join(f"{k}={v}" for k, v in params.items())})'
            overlay_dir = (Path(output) / 'overlays' / f'{number}_{name}') if output is not None and overlays else None
            run = run_backend(reader, truth, name, params, topic, limit, progress, overlay_dir, overlays)
            metrics = evaluate(gt, run.predictions, funnel=run.funnel or None)
            scopes = list(metrics['materials'])
            report['backends'][label] = {
                'backend': name, 'params': params, 'frames': run.frames,
                'detect_seconds': run.detect_seconds,
                'seconds_per_100_frames': 100.0 * run.detect_seconds / max(run.frames, 1),
                'metrics': metrics,
                'pr_curves': {scope: precision_recall_curve(gt, run.predictions, None if scope == 'all' else scope)
                              for scope in scopes},
                'predictions': run.predictions,
            }
    if output is not None:
        write_report(report, Path(output), gt)
    return report


def markdown_report(report: dict) -> str:
    """Backends side by side, then each backend's full tables from the evaluation module."""
    from flake_detector.evaluation import markdown_report as metrics_markdown

    lines = [f"Bag `{report['bag']}`: {report['frames']} frame(s), "
             f"{report['ground_truth_flakes']} ground-truth object(s).", '',
             '| backend | s / 100 frames | predictions | box AP | mask AP | AP50 (mask) | img P | img R |',
             '|---|---|---|---|---|---|---|---|']
    for label, entry in report['backends'].items():
        scope = entry['metrics']['materials']['all']
        segm = scope['segm'] or {}
        values = [scope['bbox']['AP'], segm.get('AP'), segm.get('AP50'),
                  scope['per_image']['precision'], scope['per_image']['recall']]
        cells = ['-' if v is None else f'{v:.3f}' for v in values]
        lines.append(f"| {label} | {entry['seconds_per_100_frames']:.2f} | {scope['predictions']} | "
                     + ' | '.join(cells) + ' |')
    for label, entry in report['backends'].items():
        lines += ['', f'### {label}', '', metrics_markdown(entry['metrics']).rstrip()]
    return '\n'.join(lines) + '\n'


def write_report(report: dict, output: Path, gt: dict) -> list[Path]:
    """report.json, report.md, ground_truth_frames.json and pr_<scope>.png (one curve per backend)."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    output.mkdir(parents=True, exist_ok=True)
    written = [output / 'report.json', output / 'report.md', output / 'ground_truth_frames.json']
    written[0].write_text(json.dumps(report, indent=1, default=_json_default))
    written[1].write_text(markdown_report(report))
    written[2].write_text(json.dumps(gt, default=_json_default))
    scopes = sorted({scope for entry in report['backends'].values() for scope in entry['pr_curves']})
    for scope in scopes:
        figure, axes = plt.subplots(figsize=(5, 4), dpi=100)
        for label, entry in report['backends'].items():
            curve = entry['pr_curves'].get(scope)
            if curve and curve['recall']:
                axes.plot(curve['recall'], curve['precision'], drawstyle='steps-post', label=label)
        axes.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel='recall', ylabel='precision',
                 title=f'{scope}: precision-recall (mask IoU >= 0.5)')
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(loc='lower left', fontsize=8)
        path = output / f'pr_{scope}.png'
        figure.tight_layout()
        figure.savefig(path)
        plt.close(figure)
        written.append(path)
    return written


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f'{type(value).__name__} is not JSON serialisable')


if __name__ == '__main__':
    sys.exit(main())
