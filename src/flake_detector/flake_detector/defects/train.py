"""Training of CNN-1 (hexagonal cells or, for comparison, unit cells) and CNN-2 on simulated images.

Training frames are drawn at random from every 2H material given and from a wide range
of imaging conditions, so the networks learn the lattice's structure rather than one
contrast: the detector's inner angle (12-40 or 60-120 mrad; 40-60 and beyond 120 are left
for testing), the stacked chalcogen's weight, probe size, dose (4-40 counts at the brighter
column), background, drift, scan jitter and streaks, per-column brightness spread, smooth
contamination blobs and holes. Frames are rendered in the networks' frame (the lattice
constant spans 30 px, a lattice vector along x, within +-2 degrees and +-5 % of it, as the
lattice fit leaves them), either way round (metal at the top vertex or not).

Both commands print progress with an ETA, save the checkpoint atomically every
``--checkpoint-every`` steps and at the end, and write a model card (JSON: command, data
seed, materials, metrics, git commit) next to it. Training and validation data come from
disjoint seeds of the simulator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
import json
from pathlib import Path
import subprocess
import sys
import time

import numpy as np
import torch
from torch.nn import functional

from flake_core.materials import STEM_MATERIALS, stem_lattice

from . import GENERIC_CLASS_NAMES
from .calibrate import SublatticeDecision, calibrate_cells, calibrated_crops
from .casting import match_accuracy
from .lattice import CANONICAL_LATTICE_PX
from .models import (
    ClassifierConfig,
    DetectorConfig,
    build_classifier,
    build_detector,
    classify,
    crop_unit_cells,
    normalise,
    save_checkpoint,
    to_detector_tensor,
)
from .simulate import StemSample, StemSimConfig, balanced_config, simulate

# Detector training frames carry more defects than real samples so that cells with weak
# contrast (no metal) are seen often enough.
DETECTOR_TRAIN_PROBABILITIES = (0.0, 0.06, 0.04, 0.04, 0.03, 0.03)
TRAIN_INNER_MRAD = ((12.0, 40.0), (60.0, 120.0))
# Exponent range the analyzer assumes when no detector is named: every annular detector.
ANY_DETECTOR_EXPONENTS = (0.7, 2.1)


def training_config(rng: np.random.Generator, materials=STEM_MATERIALS, size: int = 768,
                    inner_ranges=TRAIN_INNER_MRAD, **changes) -> StemSimConfig:
    """One training frame's sample and imaging ranges, drawn from the training distribution."""
    material = str(materials[int(rng.integers(len(materials)))])
    lengths = np.array([high - low for low, high in inner_ranges])
    low, high = inner_ranges[int(rng.choice(len(inner_ranges), p=lengths / lengths.sum()))]
    lattice_a = stem_lattice(material).lattice_a
    base = dict(
        material=material, height=size, width=size,
        pixel_size=lattice_a / CANONICAL_LATTICE_PX * float(rng.uniform(0.95, 1.05)),
        rotation_deg=(-2.0, 2.0), swap_probability=0.5, detector_inner_mrad=(low, high), exponent_spread=0.1,
        stack_factor=(0.8, 1.0), probe_fwhm=(0.8e-10, 1.5e-10), dose=(4.0, 40.0), read_noise=0.5,
        background=(0.02, 0.3), drift=3e-11, jitter_px=float(rng.uniform(0.0, 1.0)),
        line_gain_sigma=float(rng.uniform(0.0, 0.03)), column_gain_sigma=float(rng.uniform(0.0, 0.1)),
        contamination=(0.0, 0.3) if rng.random() < 0.6 else (0.0, 0.0), contamination_style='blobs',
        contamination_level=(0.3, 1.0), holes=(0.0, 0.12) if rng.random() < 0.4 else (0.0, 0.0))
    base.update(changes)
    return StemSimConfig(**base)


def git_commit() -> str:
    try:
        return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def write_model_card(checkpoint: Path, card: dict) -> Path:
    path = checkpoint.with_suffix('.json')
    card = {'checkpoint': checkpoint.name, 'git_commit': git_commit(), 'torch': torch.__version__, **card}
    tmp = path.with_suffix('.json.tmp')
    tmp.write_text(json.dumps(card, indent=2, sort_keys=True) + '\n')
    tmp.replace(path)
    return path


class Progress:
    """One line per report: step, loss, rate and remaining time."""

    def __init__(self, total: int, every: int, label: str, stream=sys.stderr):
        self.total, self.every, self.label, self.stream = total, max(every, 1), label, stream
        self.start = time.monotonic()

    def step(self, done: int, **values: float) -> None:
        if done % self.every and done != self.total:
            return
        elapsed = time.monotonic() - self.start
        eta = elapsed / max(done, 1) * (self.total - done)
        shown = ' '.join(f'{k}={v:.4f}' for k, v in values.items())
        print(f'[{self.label}] {done}/{self.total} {shown} elapsed={elapsed:.0f}s eta={eta:.0f}s',
              file=self.stream, flush=True)


# ---------------------------------------------------------------- CNN-1

@dataclass
class DetectorTraining:
    target: str = 'hex'
    steps: int = 800
    batch: int = 2
    crop: int = 192               # training crop in the networks' frame [px]
    lr: float = 1e-4              # Adam, Yang et al. (2024)
    images: int = 32              # simulated training frames
    image_size: int = 768         # [px] in the networks' frame (about 25 lattice constants)
    val_images: int = 4
    seed: int = 0
    threads: int = 1
    pretrained: bool = True
    checkpoint_every: int = 100
    materials: tuple[str, ...] = field(default_factory=lambda: tuple(STEM_MATERIALS))


def detector_pool(count: int, size: int, seed: int, target: str, materials=STEM_MATERIALS):
    """Simulated training frames, normalised, with their target boxes."""
    rng = np.random.default_rng(seed * 7919 + 1)
    pool = []
    for index in range(count):
        config = training_config(rng, materials, size, defect_probabilities=DETECTOR_TRAIN_PROBABILITIES)
        sample = simulate(config, seed=seed * 100003 + index)
        pool.append((normalise(sample.image), sample.hex_boxes if target == 'hex' else sample.unit_boxes))
    return pool


def _random_crop(tile: np.ndarray, boxes: np.ndarray, crop: int, rng: np.random.Generator):
    H, W = tile.shape
    y0 = int(rng.integers(0, max(H - crop, 0) + 1))
    x0 = int(rng.integers(0, max(W - crop, 0) + 1))
    patch = tile[y0:y0 + crop, x0:x0 + crop]
    shifted = boxes - np.array([x0, y0, x0, y0], dtype=np.float32)
    inside = ((shifted[:, 0] >= 0) & (shifted[:, 1] >= 0)
              & (shifted[:, 2] <= patch.shape[1]) & (shifted[:, 3] <= patch.shape[0]))
    # Brightness and contrast jitter: the normalisation of real frames is never exact.
    patch = patch * rng.uniform(0.8, 1.2) + rng.uniform(-0.08, 0.08)
    return patch.astype(np.float32), shifted[inside]


def train_detector(options: DetectorTraining, out: Path, command: str = '') -> dict:
    torch.manual_seed(options.seed)
    torch.set_num_threads(options.threads)
    rng = np.random.default_rng(options.seed)
    config = DetectorConfig(target=options.target)
    print(f'[train-cells] simulating {options.images} training frames', file=sys.stderr, flush=True)
    pool = detector_pool(options.images, options.image_size, options.seed, options.target, options.materials)
    model = build_detector(config, pretrained=options.pretrained)
    model.train()
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=options.lr)
    progress = Progress(options.steps, 10, f'train-cells {options.target}')
    for step in range(1, options.steps + 1):
        images, targets = [], []
        for _ in range(options.batch):
            tile, boxes = pool[int(rng.integers(len(pool)))]
            patch, patch_boxes = _random_crop(tile, boxes, options.crop, rng)
            images.append(to_detector_tensor(patch))
            targets.append({'boxes': torch.from_numpy(patch_boxes).float().reshape(-1, 4),
                            'labels': torch.ones(len(patch_boxes), dtype=torch.int64)})
        losses = model(images, targets)
        loss = sum(losses.values())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        progress.step(step, loss=float(loss.detach()), **{k: float(v.detach()) for k, v in losses.items()})
        if step % options.checkpoint_every == 0 and step < options.steps:
            save_checkpoint(out, 'detector', config, model)
    model.eval()
    save_checkpoint(out, 'detector', config, model)
    metrics = evaluate_detector(model, config, options.val_images, options.seed + 1_000_000, options.image_size,
                                options.materials)
    card = {'name': f'cnn1-{options.target}', 'kind': 'detector', 'command': command,
            'data_seed': options.seed, 'validation_seed': options.seed + 1_000_000,
            'training': asdict(options), 'config': asdict(config), 'metrics': metrics,
            'pretrained_backbone': options.pretrained and _has_imagenet_weights()}
    write_model_card(out, card)
    return card


def _has_imagenet_weights() -> bool:
    from .models import mobilenet_weights_path
    return mobilenet_weights_path() is not None


def evaluate_detector(model, config: DetectorConfig, images: int, seed: int, size: int = 768,
                      materials=STEM_MATERIALS) -> dict:
    """Unit-cell detection accuracy (share of true cells matched with IoU > 0.5) on fresh training-like frames."""
    from .analyze import detect_unit_cells
    rng = np.random.default_rng(seed)
    matched, total = 0, 0
    for index in range(images):
        sample = simulate(training_config(rng, materials, size), seed=seed + index)
        boxes, _ = detect_unit_cells(model, config, normalise(sample.image))
        accuracy, _ = match_accuracy(boxes, sample.unit_boxes)
        matched += round(accuracy * len(sample.unit_boxes))
        total += len(sample.unit_boxes)
    return {'unit_cell_accuracy': matched / max(total, 1), 'unit_cells': total, 'images': images}


# ---------------------------------------------------------------- CNN-2

@dataclass
class ClassifierTraining:
    channels: int = 2
    input_size: int = 32
    calibrated: bool = True
    steps: int = 400
    batch: int = 64
    lr: float = 1e-3
    images: int = 48              # balanced simulated training frames
    image_size: int = 512         # [px] in the networks' frame
    val_images: int = 12
    seed: int = 0
    threads: int = 1
    box_jitter: float = 0.06      # random shift/scale of boxes, a fraction of the box size
    checkpoint_every: int = 200
    materials: tuple[str, ...] = field(default_factory=lambda: tuple(STEM_MATERIALS))


def truth_decision(sample: StemSample) -> SublatticeDecision:
    """The sublattice assignment the simulator used (training crops do not depend on the decision rule)."""
    site = 'Q' if sample.params['swap'] else 'P'
    ratio = sample.params['chalcogen_metal_ratio']
    return SublatticeDecision(site, 'truth', ratio, (ratio, ratio), True)


def cell_inputs(sample: StemSample, boxes: np.ndarray, config: ClassifierConfig,
                decision: SublatticeDecision | None = None) -> torch.Tensor:
    """Classifier inputs for ``boxes`` of a frame rendered in the networks' frame."""
    if not config.calibrated:
        return crop_unit_cells(normalise(sample.image), boxes, config.channels, config.input_size)
    if config.channels != 2:
        raise ValueError('the self-calibrated input has two channels (chalcogen, metal)')
    lattice = stem_lattice(sample.material)
    lattice_px = lattice.lattice_a / sample.pixel_size
    decision = decision or truth_decision(sample)
    calibration, decision = calibrate_cells(sample.image, boxes, lattice_px, lattice, ANY_DETECTOR_EXPONENTS,
                                            decision=decision)
    return torch.from_numpy(calibrated_crops(sample.image, boxes, calibration, decision.metal_site,
                                             config.input_size))


def classifier_dataset(images: int, size: int, seed: int, config: ClassifierConfig, box_jitter: float,
                       materials=STEM_MATERIALS,
                       make_config: Callable[[np.random.Generator], StemSimConfig] | None = None):
    """Crops of every clean unit cell of ``images`` balanced simulated frames: (inputs, labels, materials).

    ``make_config`` draws a frame's configuration (default: the training distribution).
    """
    rng = np.random.default_rng(seed + 7)
    inputs, labels, names = [], [], []
    for index in range(images):
        sim = make_config(rng) if make_config else training_config(rng, materials, size)
        sample = simulate(balanced_config(sim), seed=seed * 100003 + index)
        clean = sample.unit_clean
        boxes = jitter_boxes(sample.unit_boxes[clean], box_jitter, rng)
        inputs.append(cell_inputs(sample, boxes, config))
        labels.append(torch.from_numpy(sample.unit_classes[clean]))
        names += [sample.material] * int(clean.sum())
    return torch.cat(inputs), torch.cat(labels), np.array(names)


def jitter_boxes(boxes: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Shift and rescale boxes by up to ``amount`` of their size: detections are never exact."""
    if amount <= 0:
        return boxes
    size = np.concatenate([boxes[:, 2:] - boxes[:, :2]] * 2, 1)
    return boxes + rng.uniform(-amount, amount, size=boxes.shape) * size


def train_classifier(options: ClassifierTraining, out: Path | None, command: str = '',
                     verbose: bool = True) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(options.seed)
    torch.set_num_threads(options.threads)
    rng = np.random.default_rng(options.seed)
    config = ClassifierConfig(channels=options.channels, input_size=options.input_size, calibrated=options.calibrated)
    if verbose:
        print(f'[train-classifier] simulating {options.images} training frames', file=sys.stderr, flush=True)
    inputs, labels, _ = classifier_dataset(options.images, options.image_size, options.seed, config,
                                           options.box_jitter, options.materials)
    model = build_classifier(config)
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=options.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, options.steps)
    progress = Progress(options.steps, 20 if verbose else 10**9, f'train-classifier {options.channels}ch')
    for step in range(1, options.steps + 1):
        index = torch.from_numpy(rng.integers(0, len(labels), size=options.batch))
        batch = inputs[index]
        # Per-crop gain and offset: references measured on a neighbourhood are never exact.
        gain = torch.from_numpy(rng.uniform(0.9, 1.1, size=(options.batch, 1, 1, 1))).float()
        offset = torch.from_numpy(rng.uniform(-0.05, 0.05, size=(options.batch, 1, 1, 1))).float()
        loss = functional.cross_entropy(model(batch * gain + offset), labels[index])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        progress.step(step, loss=float(loss.detach()))
        if out is not None and step % options.checkpoint_every == 0 and step < options.steps:
            save_checkpoint(out, 'classifier', config, model)
    model.eval()
    val_inputs, val_labels, _ = classifier_dataset(options.val_images, options.image_size, options.seed + 1_000_000,
                                                   config, options.box_jitter, options.materials)
    metrics = evaluate_classifier(model, val_inputs, val_labels)
    card = {'name': f'cnn2-{options.channels}ch' + ('' if options.calibrated else '-uncalibrated'),
            'kind': 'classifier', 'command': command, 'data_seed': options.seed,
            'validation_seed': options.seed + 1_000_000, 'training': asdict(options), 'config': asdict(config),
            'metrics': metrics, 'training_crops': int(len(labels))}
    if out is not None:
        save_checkpoint(out, 'classifier', config, model)
        write_model_card(out, card)
    return model, card


def evaluate_classifier(model, inputs: torch.Tensor, labels: torch.Tensor) -> dict:
    predicted = classify(model, inputs).argmax(1)
    per_class = {}
    for k, name in enumerate(GENERIC_CLASS_NAMES):
        mask = labels == k
        per_class[name] = float((predicted[mask] == k).float().mean()) if mask.any() else float('nan')
    return {'accuracy': float((predicted == labels).float().mean()), 'per_class_accuracy': per_class,
            'validation_crops': int(len(labels))}


def default_classifier_training(**changes) -> ClassifierTraining:
    return replace(ClassifierTraining(), **changes)

