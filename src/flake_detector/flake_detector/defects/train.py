"""Training of CNN-1 (hexagonal cells or, for comparison, unit cells) and CNN-2 on simulated images.

Both commands print progress with an ETA, save the checkpoint atomically every
``--checkpoint-every`` steps and at the end, and write a model card (JSON: command,
data seed, metrics, git commit) next to it. Training and validation data come from
disjoint seeds of the simulator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
import json
from pathlib import Path
import subprocess
import sys
import time

import cv2
import numpy as np
import torch
from torch.nn import functional

from . import CLASS_NAMES
from .casting import match_accuracy
from .models import (
    ClassifierConfig,
    DetectorConfig,
    build_classifier,
    build_detector,
    classify,
    crop_unit_cells,
    detector_scale,
    normalise,
    save_checkpoint,
    to_detector_tensor,
)
from .simulate import StemSample, StemSimConfig, balanced_config, simulate

# Detector training images carry more defects than real samples so that cells with
# weak contrast (V_Te2+V_Mo) are seen often enough.
DETECTOR_TRAIN_PROBABILITIES = (0.0, 0.06, 0.04, 0.04, 0.03, 0.03)


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
    steps: int = 300
    batch: int = 2
    crop: int = 192               # training crop at the detector's scale [px]
    lr: float = 1e-4              # Adam, seed 003
    images: int = 24              # simulated training images (full resolution, then resampled)
    image_size: int = 1024        # [px] at seed 003's scale
    val_images: int = 3
    seed: int = 0
    threads: int = 1
    pretrained: bool = True
    checkpoint_every: int = 100


def _detector_pool(count: int, size: int, seed: int, target: str, lattice_px: float):
    """Simulated images resampled to the detector's scale with their target boxes."""
    config = StemSimConfig(height=size, width=size, defect_probabilities=DETECTOR_TRAIN_PROBABILITIES)
    pool = []
    for index in range(count):
        sample = simulate(config, seed=seed * 100003 + index)
        tile, boxes = detector_view(sample, target, lattice_px)
        pool.append((tile, boxes))
    return pool


def detector_view(sample: StemSample, target: str, lattice_px: float):
    scale = detector_scale(sample.pixel_size, lattice_px)
    normalised = normalise(sample.image)
    H, W = normalised.shape
    tile = cv2.resize(normalised, (round(W * scale), round(H * scale)), interpolation=cv2.INTER_AREA)
    boxes = (sample.hex_boxes if target == 'hex' else sample.unit_boxes) * scale
    return tile, boxes


def _random_crop(tile: np.ndarray, boxes: np.ndarray, crop: int, rng: np.random.Generator):
    H, W = tile.shape
    y0 = int(rng.integers(0, max(H - crop, 0) + 1))
    x0 = int(rng.integers(0, max(W - crop, 0) + 1))
    patch = tile[y0:y0 + crop, x0:x0 + crop]
    shifted = boxes - np.array([x0, y0, x0, y0], dtype=np.float32)
    inside = ((shifted[:, 0] >= 0) & (shifted[:, 1] >= 0)
              & (shifted[:, 2] <= patch.shape[1]) & (shifted[:, 3] <= patch.shape[0]))
    # Brightness and contrast jitter: the normalisation of real frames is never exact.
    patch = patch * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05)
    return patch.astype(np.float32), shifted[inside]


def train_detector(options: DetectorTraining, out: Path, command: str = '') -> dict:
    torch.manual_seed(options.seed)
    torch.set_num_threads(options.threads)
    rng = np.random.default_rng(options.seed)
    config = DetectorConfig(target=options.target)
    print(f'[train-cells] simulating {options.images} training images', file=sys.stderr, flush=True)
    pool = _detector_pool(options.images, options.image_size, options.seed, options.target, config.lattice_px)
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
    metrics = evaluate_detector(model, config, options.val_images, options.seed + 1_000_000)
    card = {'name': f'cnn1-{options.target}', 'kind': 'detector', 'command': command,
            'data_seed': options.seed, 'validation_seed': options.seed + 1_000_000,
            'training': asdict(options), 'config': asdict(config), 'metrics': metrics,
            'pretrained_backbone': options.pretrained and _has_imagenet_weights()}
    write_model_card(out, card)
    return card


def _has_imagenet_weights() -> bool:
    from .models import mobilenet_weights_path
    return mobilenet_weights_path() is not None


def evaluate_detector(model, config: DetectorConfig, images: int, seed: int, size: int = 1024,
                      dose: tuple[float, float] = (5.0, 20.0)) -> dict:
    """Unit-cell detection accuracy (share of true cells matched with IoU > 0.5) on fresh images."""
    from .analyze import detect_unit_cells
    sim = StemSimConfig(height=size, width=size, dose=dose)
    matched, total = 0, 0
    for index in range(images):
        sample = simulate(sim, seed=seed + index)
        boxes, _ = detect_unit_cells(model, config, normalise(sample.image), sample.pixel_size)
        accuracy, _ = match_accuracy(boxes, sample.unit_boxes)
        matched += round(accuracy * len(sample.unit_boxes))
        total += len(sample.unit_boxes)
    return {'unit_cell_accuracy': matched / max(total, 1), 'unit_cells': total, 'images': images}


# ---------------------------------------------------------------- CNN-2

@dataclass
class ClassifierTraining:
    channels: int = 2
    input_size: int = 224
    steps: int = 400
    batch: int = 32
    lr: float = 1e-3
    images: int = 40              # balanced simulated training images
    image_size: int = 768
    val_images: int = 12
    seed: int = 0
    threads: int = 1
    box_jitter: float = 0.06      # random shift/scale of crops, a fraction of the box size
    checkpoint_every: int = 200


def classifier_dataset(images: int, size: int, seed: int, channels: int, input_size: int,
                       box_jitter: float, dose: tuple[float, float] = (5.0, 20.0), **sim_changes):
    """Crops of every unit cell of ``images`` balanced simulated images: (inputs, labels)."""
    config = balanced_config(StemSimConfig(height=size, width=size, dose=dose, **sim_changes))
    rng = np.random.default_rng(seed + 7)
    inputs, labels = [], []
    for index in range(images):
        sample = simulate(config, seed=seed * 100003 + index)
        boxes = jitter_boxes(sample.unit_boxes, box_jitter, rng)
        inputs.append(crop_unit_cells(normalise(sample.image), boxes, channels, input_size))
        labels.append(torch.from_numpy(sample.unit_classes))
    return torch.cat(inputs), torch.cat(labels)


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
    config = ClassifierConfig(channels=options.channels, input_size=options.input_size)
    if verbose:
        print(f'[train-classifier] simulating {options.images} training images', file=sys.stderr, flush=True)
    inputs, labels = classifier_dataset(options.images, options.image_size, options.seed, options.channels,
                                        options.input_size, options.box_jitter)
    model = build_classifier(config)
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=options.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, options.steps)
    progress = Progress(options.steps, 20 if verbose else 10**9, f'train-classifier {options.channels}ch')
    for step in range(1, options.steps + 1):
        index = torch.from_numpy(rng.integers(0, len(labels), size=options.batch))
        batch = inputs[index]
        # Per-crop gain and offset so the network relies on column contrast, not absolute level.
        gain = torch.from_numpy(rng.uniform(0.85, 1.15, size=(options.batch, 1, 1, 1))).float()
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
    val_inputs, val_labels = classifier_dataset(options.val_images, options.image_size,
                                                options.seed + 1_000_000, options.channels,
                                                options.input_size, options.box_jitter)
    metrics = evaluate_classifier(model, val_inputs, val_labels)
    card = {'name': f'cnn2-{options.channels}ch', 'kind': 'classifier', 'command': command,
            'data_seed': options.seed, 'validation_seed': options.seed + 1_000_000,
            'training': asdict(options), 'config': asdict(config), 'metrics': metrics,
            'training_crops': int(len(labels))}
    if out is not None:
        save_checkpoint(out, 'classifier', config, model)
        write_model_card(out, card)
    return model, card


def evaluate_classifier(model, inputs: torch.Tensor, labels: torch.Tensor) -> dict:
    predicted = classify(model, inputs).argmax(1)
    per_class = {}
    for k, name in enumerate(CLASS_NAMES):
        mask = labels == k
        per_class[name] = float((predicted[mask] == k).float().mean()) if mask.any() else float('nan')
    return {'accuracy': float((predicted == labels).float().mean()), 'per_class_accuracy': per_class,
            'validation_crops': int(len(labels))}


def default_classifier_training(**changes) -> ClassifierTraining:
    return replace(ClassifierTraining(), **changes)
