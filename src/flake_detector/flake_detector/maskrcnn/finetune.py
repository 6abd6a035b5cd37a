"""Few-shot fine-tuning of the class-agnostic Mask R-CNN on a lab's own labelled micrographs.

``flake-finetune --backend maskrcnn --coco my_lab/labels.json --input-scale 0.2 --out my_lab/maskrcnn.pt``

The network learns what the lab calls a flake (where its outlines run, which crumbs it
leaves out) from a few labelled images; material and thickness still come from the
optical estimator inside the detection. Training starts from a trained checkpoint (the
shipped one unless ``base`` names a weights file), runs ``steps`` SGD iterations on
random ``input_size`` crops of the labelled images (centred near a labelled flake most of
the time; flips, rotations and colour gains as in training), with a linear warm-up over
the first tenth and the learning rate divided by ten for the last fifth, and writes a
checkpoint whose configuration carries the new ``input_scale`` (model pixels per image
pixel), so the detector needs no option to read the lab's frames. The model card beside
it names the base, the data, the schedule, the seed and the loss at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
import datetime as dt
from pathlib import Path
import time

import torch

from flake_detector.maskrcnn.data import Augmentation, CocoFlakeDataset, collate
from flake_detector.maskrcnn.infer import SHIPPED_MODEL
from flake_detector.maskrcnn.train import (
    git_commit,
    make_optimizer,
    model_from_checkpoint,
    save_checkpoint,
    set_trainable,
    train_step,
)

# Shares of the schedule: the warm-up at its start, the x0.1 stage at its end.
WARMUP_SHARE = 0.1
LOW_RATE_SHARE = 0.2


def base_checkpoint(base: str | None) -> Path:
    """The checkpoint to start from: ``base`` when it is a file, else the shipped model (a
    name such as a cascade target means no Mask R-CNN file of the lab's)."""
    if base and Path(base).suffix == '.pt':
        path = Path(base)
        if not path.is_file():
            raise FileNotFoundError(f'no Mask R-CNN checkpoint at {path}')
        return path
    return SHIPPED_MODEL


def learning_rate_at(step: int, steps: int, lr: float) -> float:
    """Warm-up over the first tenth, the full rate, a tenth of it over the last fifth."""
    warmup = max(1, round(WARMUP_SHARE * steps))
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= steps - round(LOW_RATE_SHARE * steps):
        return 0.1 * lr
    return lr


def finetune(coco: list[str], out: str, base: str | None = None, steps: int = 600, lr: float = 2e-3,
             seed: int = 0, threads: int = 2, material: str | None = None, input_scale: float = 0.0,
             batch_size: int = 2, log: Callable[[str], None] = print,
             command: str = 'flake-finetune --backend maskrcnn') -> Path:
    """Fine-tune on the COCO files ``coco`` (images beside each file) and write ``out`` (.pt)
    with its model card (.json). ``input_scale`` (model pixels per image pixel; 0 keeps the
    base's) puts the lab's flakes at the size the network learned; ``material`` is recorded
    on the card (the network has one class, the optics name the material), as is ``command``."""
    if steps < 1 or not lr > 0 or batch_size < 1:
        raise ValueError(f'need steps >= 1, lr > 0 and batch_size >= 1, got {steps}, {lr}, {batch_size}')
    if not 0.0 <= input_scale <= 16.0:
        raise ValueError(f'input_scale must be within 0..16 (0 = the base model\'s), got {input_scale}')
    torch.set_num_threads(max(1, int(threads)))
    torch.manual_seed(seed)
    start = base_checkpoint(base)
    model, config, base_version = model_from_checkpoint(start)
    if not config.class_agnostic:
        raise ValueError(f'{start} has material x layer classes; fine-tuning needs a class-agnostic model')
    if input_scale > 0:
        config = replace(config, pixel_scale=float(input_scale))
    parts = [CocoFlakeDataset(path, None, config.input_size, config.pixel_scale, Augmentation(), 0.0, None,
                              seed + k, class_agnostic=True) for k, path in enumerate(coco)]
    flakes = sum(p.total_annotations for p in parts)
    if not flakes:
        raise ValueError(f'no labelled flakes in {", ".join(coco)} (contaminants and bulk crystals are no target)')
    dataset = torch.utils.data.ConcatDataset(parts)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(seed))
    log(f'fine-tuning {start.name} ({base_version}) on {len(dataset)} images, {flakes} flakes, '
        f'{steps} steps at lr {lr:g}, input scale {config.pixel_scale:g}')
    set_trainable(model, 'all')
    optimizer = make_optimizer(model, lr)
    started, cpu_started = time.monotonic(), time.process_time()
    step, recent = 0, []
    while step < steps:
        for images, targets in loader:
            for group in optimizer.param_groups:
                group['lr'] = learning_rate_at(step, steps, lr)
            losses = train_step(model, optimizer, images, targets)
            recent = (recent + [losses['total']])[-20:]
            step += 1
            if step % 20 == 0 or step == steps:
                log(f'step {step}/{steps}: loss {sum(recent) / len(recent):.3f}, '
                    f'{(time.monotonic() - started) / step:.1f} s/step')
            if step >= steps:
                break
    card = {'command': command, 'base': str(start.name), 'base_version': base_version,
            'data': [str(Path(p).name) for p in coco], 'data_images': len(dataset), 'data_annotations': flakes,
            'material': material, 'steps': steps, 'lr': lr, 'batch_size': batch_size, 'seed': seed,
            'input_scale': config.pixel_scale, 'loss_last_20_steps': sum(recent) / len(recent),
            'cpu_seconds': round(time.process_time() - cpu_started, 1), 'threads': threads,
            'commit': git_commit(), 'created': dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}
    path = Path(out)
    card = save_checkpoint(path, model, config, card)
    log(f'model {card["model_version"]}: card {path.with_suffix(".json")}')
    return path
