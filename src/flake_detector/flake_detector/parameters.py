"""Parameter schemas of the detector's nodes (flake_core.parameters): the one source of their
declared parameters, the typed views the nodes read, the YAML checks and docs/parameters.md."""

from __future__ import annotations

from dataclasses import dataclass
import json

from flake_core.materials import parse_materials
from flake_core.parameters import param
from flake_detector.defects.simulate import SEED_PIXEL_SIZE
from flake_detector.detection import available_detectors


def _backend_error(name: str) -> str | None:
    return None if name in available_detectors() else f'backend must be one of {available_detectors()}, got {name!r}'


def _materials_error(text: str) -> str | None:
    try:
        parse_materials(text)
    except ValueError as exc:
        return f'materials: {exc}'
    return None


def _calibration_error(text: str) -> str | None:
    from pathlib import Path

    from flake_core.calibration import SOURCES

    if text in SOURCES or Path(text).is_file():
        return None
    return f'calibration must be one of {", ".join(SOURCES)} or a calibration file; no such file: {text}'


def _json_object_error(text: str) -> str | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return f'backend_params is not JSON: {exc}'
    return None if isinstance(value, dict) else 'backend_params must be a JSON object'


@dataclass(frozen=True)
class DetectorNodeParameters:
    """Parameters of the ``detector_node`` node."""

    backend: str = param('contrast', 'detector backend', validator=_backend_error)
    input_topic: str = param('scan/tiles', 'ScanFrame topic to detect flakes in', read_only=True)
    output_topic: str = param('detections', 'FlakeArray topic of the detections', read_only=True)
    queue_size: int = param(4,
          'frames waiting in memory for the worker; more are spilled to disk',
          minimum=1, maximum=1000, read_only=True)
    spill_dir: str = param('',
          'where frames wait when the queue is full; empty = $FLAKE_DATA_DIR/detector_spill or the system temp dir',
          read_only=True)
    materials: str = param('graphene', 'contrast backend: comma-separated materials to match',
                           validator=_materials_error)
    oxide_nm: float = param(90.0, 'SiO2 thickness of the chips [nm]', minimum=1.0, maximum=2000.0)
    calibration: str = param('auto', 'microscope calibration every backend reads: auto, measured, model, or a '
                             'calibration file written by flake-calibrate', validator=_calibration_error)
    min_area_px: int = param(60, 'smallest flake reported [px]', minimum=1, maximum=10_000_000)
    min_area_um2: float = param(0.0,
          'smallest flake published, in um^2 at the sample (from each frame\'s pixel -> wafer map), whatever the '
          'magnification: at 10x 60 px are 18 um^2, at a 50x revisit 0.7 um^2; 0 = min_area_px alone',
          minimum=0.0, maximum=1e6)
    max_layers: float = param(40.0, 'contrast backend: thickest flake reported [layers]', minimum=1.0, maximum=10000.0)
    max_elongation: float = param(5.0,
          'contrast backend: a region whose area exceeds this times the square of its widest width is a line (tape '
          'residue) and is dropped',
          minimum=1.0, maximum=1000.0)
    work_size: int = param(1024,
          'contrast backend: frames with a longer side are segmented at this long side [px] (the blur of a '
          'megapixel camera spans several pixels); 0 = full resolution',
          minimum=0, maximum=16384)
    target: str = param('graphene-1-10L', 'cascade backend: shipped target (models/cascade_<target>.pt)')
    model_path: str = param('', 'cascade backend: weights file overriding the shipped target')
    cascade_threshold: float = param(0.5, 'cascade backend: P(good) every net must reach', minimum=0.0, maximum=1.0)
    std_threshold: float = param(0.02,
          'cascade backend: candidate finder relative std threshold',
          minimum=1e-4, maximum=1.0)
    backend_params: str = param('{}',
          'JSON object of further keyword parameters for the backend (e.g. {"model_path": "..."} for maskrcnn); '
          'they override the ones above',
          validator=_json_object_error)
    min_score: float = param(0.0, 'detections below this score are not published', minimum=0.0, maximum=1.0)
    diagnostics_period: float = param(1.0, 'seconds between /diagnostics messages', minimum=0.1, maximum=60.0)


def _stem_material_error(name: str) -> str | None:
    from flake_core.materials import stem_lattice
    try:
        stem_lattice(name)
    except ValueError as exc:
        return str(exc)
    return None


def _adf_detector_error(spec: str) -> str | None:
    from flake_detector.defects.adf import detector_from
    if not spec:
        return None
    try:
        detector_from(spec)
    except ValueError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class DefectAnalyzerNodeParameters:
    """Parameters of the ``defect_analyzer_node`` node."""

    detector_checkpoint: str = param('', 'CNN-1 checkpoint path; empty uses the shipped cnn1_hex.pt', read_only=True)
    classifier_checkpoint: str = param('', 'CNN-2 checkpoint path; empty uses the shipped cnn2_2ch.pt', read_only=True)
    default_pixel_size: float = param(SEED_PIXEL_SIZE,
          'pixel size [m/px] when a request gives 0 and for topic images',
          minimum=1e-13, maximum=1e-9)
    threads: int = param(1, 'CPU threads for the networks', minimum=1, maximum=64, read_only=True)
    queue_size: int = param(2,
          'images waiting for analysis before new work is refused',
          minimum=1, maximum=100, read_only=True)
    topic_mode: bool = param(True, 'analyse images arriving on /stem/image_raw', read_only=True)
    topic_include_cells: bool = param(False, 'put per-cell results into /defects/report')
    alpha: float = param(0.65, 'hexagonal-net casting W_U / W_H', minimum=0.3, maximum=1.0)
    beta: float = param(0.5, 'hexagonal-net casting H_U / H_H', minimum=0.3, maximum=1.0)
    diagnostics_period: float = param(1.0, 'seconds between /diagnostics messages', minimum=0.1, maximum=60.0)
    material: str = param('mote2', '2H material of topic images and of requests that name none',
                          validator=_stem_material_error)
    detector: str = param('', 'annular detector of topic images and of requests that name none: haadf, maadf, '
                          'laadf or INNER-OUTER mrad; empty = any (sublattices told apart by the image)',
                          validator=_adf_detector_error)
    files_dir: str = param('', 'folder that request.file paths are read from; empty = $FLAKE_DATA_DIR/stem',
                           read_only=True)
    max_queued_megabytes: int = param(512, 'decoded image bytes waiting for analysis before new work is refused',
                                      minimum=16, maximum=65536, read_only=True)


# Node name -> schema, for docs/parameters.md and the checks of config/*.yaml.
SCHEMAS = {
    'detector_node': DetectorNodeParameters,
    'defect_analyzer_node': DefectAnalyzerNodeParameters,
}
