"""flake-train-maskrcnn: train the flake Mask R-CNN on a COCO dataset (Masubuchi et al. (2020) recipe).

    flake-train-maskrcnn --data data/sim_train --out runs/maskrcnn            # all materials
    flake-train-maskrcnn --data data/sim_train --out runs/graphene \\
        --init runs/maskrcnn/final.pt --materials graphene                    # per-material transfer
    flake-train-maskrcnn --data data/sim_train --out runs/maskrcnn --resume   # continue after a crash

SGD (momentum 0.9, weight decay 1e-4), loss weights class 0.6 / box 1.0 / mask 1.0, and
the staged schedule of Masubuchi et al. (2020): heads at 1e-3, backbone from its last stage up at 1e-3,
then everything at 1e-4 and 1e-5. A checkpoint and its model card (command, data, seed,
metrics, commit) are written after every epoch; ``--resume`` restarts from the last one.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
import datetime as dt
import hashlib
import io
import json
import math
import os
from pathlib import Path
import random
import subprocess
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from flake_detector.maskrcnn.data import Augmentation, CocoFlakeDataset, collate
from flake_detector.maskrcnn.model import (
    BACKBONES,
    MATERIALS,
    ModelConfig,
    build_model,
    parse_anchor_sizes,
    set_trainable,
)

CHECKPOINT_FORMAT = 'flake-maskrcnn/1'
# Masubuchi et al. (2020): L = 0.6 L_cls + 1.0 L_box + 1.0 L_mask; the RPN terms keep weight 1.
LOSS_WEIGHTS = {'loss_classifier': 0.6, 'loss_box_reg': 1.0, 'loss_mask': 1.0,
                'loss_objectness': 1.0, 'loss_rpn_box_reg': 1.0}
MASUBUCHI_2020_STAGES = 'heads:1e-3,layer4:1e-3,all:1e-4,all:1e-5'


@dataclass(frozen=True)
class Stage:
    trainable: str  # heads | layer4 | all
    learning_rate: float
    epochs: int = 0  # 0 = --epochs-per-stage


def parse_stages(text: str) -> list[Stage]:
    """``heads:1e-3,layer4:1e-3,all:1e-4:3`` -> stages (an optional third field: epochs)."""
    stages = []
    for item in text.split(','):
        fields = item.strip().split(':')
        if fields[0] not in ('heads', 'layer4', 'all') or len(fields) not in (2, 3):
            raise ValueError(f'bad stage {item!r}: expected heads|layer4|all:<learning rate>[:<epochs>]')
        epochs = int(fields[2]) if len(fields) == 3 else 0
        if epochs < 0:
            raise ValueError(f'bad stage {item!r}: epochs must be >= 0')
        stages.append(Stage(fields[0], float(fields[1]), epochs))
    return stages


def weighted_loss(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(LOSS_WEIGHTS.get(name, 1.0) * value for name, value in losses.items())


def make_optimizer(model: torch.nn.Module, learning_rate: float) -> torch.optim.SGD:
    parameters = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(parameters, lr=learning_rate, momentum=0.9, weight_decay=1e-4)


def train_step(model, optimizer, images, targets, clip_norm: float = 10.0) -> dict[str, float]:
    """One SGD step; returns the loss terms and the weighted total."""
    model.train()
    losses = model(list(images), list(targets))
    total = weighted_loss(losses)
    if not torch.isfinite(total):
        raise FloatingPointError(f'non-finite loss {({k: float(v) for k, v in losses.items()})}')
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip_norm)
    optimizer.step()
    out = {name: float(value.detach()) for name, value in losses.items()}
    out['total'] = float(total.detach())
    return out


@torch.no_grad()
def validation_loss(model, loader, max_batches: int = 20) -> float:
    """Weighted loss on held-out data (training-mode forward without gradients)."""
    model.train()
    totals = []
    for batch, (images, targets) in enumerate(loader):
        if batch >= max_batches:
            break
        totals.append(float(weighted_loss(model(list(images), list(targets)))))
    return float(np.mean(totals)) if totals else float('nan')


def model_version(config: ModelConfig, state: dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().float().numpy().tobytes())
    soft = 'soft' if config.soft_labels.get('enabled') else 'base'
    heads = 'flake' if config.class_agnostic else 'mxc'
    return f'maskrcnn-{config.backbone}-{config.input_size}-{heads}-{soft}-{digest.hexdigest()[:10]}'


def git_commit() -> str:
    try:
        out = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def save_checkpoint(path: Path, model, config: ModelConfig, card: dict, half: bool = False,
                    training_state: dict | None = None) -> dict:
    """Write ``path`` (model, config, version, card; optional resume state) and ``path.json`` (the card).

    Written to a temporary file and renamed, so a crash never leaves a torn checkpoint."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    version = model_version(config, state)
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    card = dict(card, model_version=version, weights_dtype='float16' if half else 'float32',
                file=path.name)
    payload = {'format': CHECKPOINT_FORMAT, 'config': config.to_dict(), 'model': state,
               'version': version, 'card': card}
    if training_state is not None:
        payload['training_state'] = training_state
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    _atomic_write(path, buffer.getvalue())
    _atomic_write(path.with_suffix('.json'), (json.dumps(card, indent=2, default=str) + '\n').encode())
    return card


def annotate_card(path: str | Path, **fields) -> dict:
    """Add ``fields`` (evaluation results, data provenance) to a checkpoint's model card, in the
    checkpoint and in the JSON beside it; weights and version stay as they are."""
    path = Path(path)
    payload = load_checkpoint(path)
    payload['card'] = dict(payload['card'], **fields)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    _atomic_write(path, buffer.getvalue())
    _atomic_write(path.with_suffix('.json'), (json.dumps(payload['card'], indent=2, default=str) + '\n').encode())
    return payload['card']


def _atomic_write(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + '.tmp')
    temporary.write_bytes(data)
    os.replace(temporary, path)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint not found: {path}')
    payload = torch.load(path, map_location='cpu', weights_only=False)
    if not isinstance(payload, dict) or payload.get('format') != CHECKPOINT_FORMAT:
        raise ValueError(f'{path} is not a flake Mask R-CNN checkpoint ({CHECKPOINT_FORMAT})')
    return payload


def model_from_checkpoint(path: str | Path):
    """(model in eval mode, config, version) from a checkpoint file."""
    payload = load_checkpoint(path)
    config = ModelConfig.from_dict(payload['config'])
    model = build_model(config, pretrained_backbone=False)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in payload['model'].items()})
    model.eval()
    return model, config, payload['version']


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _pair(text: str, option: str, kind):
    try:
        first, second = (kind(v) for v in str(text).split(','))
    except ValueError:
        raise ValueError(f'{option} needs two comma-separated numbers, got {text!r}') from None
    return first, second


def _reseed(parts: list[CocoFlakeDataset], seed: int) -> None:
    """Augmentation streams from one saved seed, so a resumed run draws what it would have."""
    for k, part in enumerate(parts):
        part.rng = np.random.default_rng([seed, k])


def _resolve_data(path: Path) -> Path:
    return path / 'annotations.json' if path.is_dir() else path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='flake-train-maskrcnn', description=__doc__.split('\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', type=Path, required=True, nargs='+',
                        help='COCO annotations.json, or a directory holding one (flake-sim dataset output); '
                             'several are trained on together')
    parser.add_argument('--images', type=Path, default=None, help='image root (default: next to the json)')
    parser.add_argument('--val', type=Path, default=None, help='held-out COCO data for the validation loss')
    parser.add_argument('--out', type=Path, required=True, help='output directory for checkpoints and cards')
    parser.add_argument('--backbone', choices=BACKBONES, default='mobilenet_v2_fpn')
    parser.add_argument('--input-size', type=int, default=1024,
                        help='square model input [px] (Masubuchi et al. 2020: 1024)')
    parser.add_argument('--pixel-scale', type=float, default=0.0,
                        help='model px per camera px; 0 = resize whole image to --input-size (Masubuchi et al. (2020))')
    parser.add_argument('--fpn-channels', type=int, default=None, help='default 128 (MobileNetV2), 256 (ResNet)')
    parser.add_argument('--anchor-sizes', default='16,32,64,128,256',
                        help='anchor sizes [px] per pyramid level, levels by commas, sizes of a level by / '
                             '(e.g. 12/16/24,28/36/48,64/80/96,128/160/192)')
    parser.add_argument('--anchor-offsets', type=int, default=1,
                        help='anchor centres per feature cell along each axis (2: every half stride)')
    parser.add_argument('--rpn-iou', default='0.7,0.3',
                        help='RPN anchor IoU: positive from the first, negative below the second')
    parser.add_argument('--class-agnostic', action='store_true',
                        help="one 'flake' class; material and layers from the optical estimator at inference")
    parser.add_argument('--embedding-dim', type=int, default=256, help='D of the anchor embeddings')
    parser.add_argument('--proposals', default='600,300', help='RPN proposals kept after NMS: training,inference')
    parser.add_argument('--roi-batch', type=int, default=128, help='RoIs sampled per image for the box head')
    parser.add_argument('--soft-labels', action=argparse.BooleanOptionalAction, default=True,
                        help='soft-label RPN of Nguyen et al. 2022 (--no-soft-labels = baseline)')
    parser.add_argument('--soft-threshold', type=float, default=0.8, help='attention threshold t')
    parser.add_argument('--soft-temperature', type=float, default=0.1, help='attention softmax temperature')
    parser.add_argument('--soft-warmup', type=int, default=0,
                        help='iterations before soft labels start (the embeddings learn first)')
    parser.add_argument('--soft-ramp', type=int, default=0,
                        help='iterations over which t falls from 1 to --soft-threshold after the warm-up')
    parser.add_argument('--warmup-iterations', type=int, default=0,
                        help='linear learning-rate warm-up at the start of training')
    parser.add_argument('--keep-epochs', action='store_true',
                        help='also keep every epoch as OUT/epoch_NNN.pt (float16, for learning curves)')
    parser.add_argument('--stages', default=MASUBUCHI_2020_STAGES, help='comma list of heads|layer4|all:<lr>')
    parser.add_argument('--epochs-per-stage', type=int, default=30)
    parser.add_argument('--iterations-per-epoch', type=int, default=500)
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--no-augment', action='store_true', help='switch off Masubuchi et al. (2020) augmentation')
    parser.add_argument('--drop-annotations', type=float, default=0.0,
                        help='remove this fraction of flake annotations at random (missing-label study)')
    parser.add_argument('--materials', default='', help='comma list: train on these materials only (transfer)')
    parser.add_argument('--init', type=Path, default=None,
                        help='start from this checkpoint or local weights file (matching tensors only)')
    parser.add_argument('--no-imagenet', action='store_true',
                        help='do not initialise MobileNetV2 from the offline ImageNet weights')
    parser.add_argument('--resume', action='store_true', help='continue from OUT/last.pt')
    parser.add_argument('--export', type=Path, default=None, help='also write the final model here in float16')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--threads', type=int, default=1,
                        help='torch CPU threads (1 is fastest on shared, busy cores)')
    parser.add_argument('--device', default='cpu')
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args, argv if argv is not None else sys.argv[1:])
    except (FileNotFoundError, ValueError) as exc:
        print(f'flake-train-maskrcnn: error: {exc}', file=sys.stderr)
        return 2


def run(args, argv: list[str]) -> int:
    torch.set_num_threads(max(1, args.threads))
    _seed_everything(args.seed)
    stages = parse_stages(args.stages)
    materials = tuple(m.strip().lower() for m in args.materials.split(',') if m.strip()) or None
    for material in materials or ():
        if material not in MATERIALS:
            raise ValueError(f'unknown material {material!r}; known: {", ".join(MATERIALS)}')
    fpn = args.fpn_channels or (128 if args.backbone == 'mobilenet_v2_fpn' else 256)
    config = ModelConfig(backbone=args.backbone, input_size=args.input_size, pixel_scale=args.pixel_scale,
                         fpn_channels=fpn, anchor_sizes=parse_anchor_sizes(args.anchor_sizes),
                         anchor_offsets=args.anchor_offsets,
                         rpn_fg_iou=_pair(args.rpn_iou, '--rpn-iou', float)[0],
                         rpn_bg_iou=_pair(args.rpn_iou, '--rpn-iou', float)[1],
                         class_agnostic=args.class_agnostic, embedding_dim=args.embedding_dim,
                         rpn_proposals_train=_pair(args.proposals, '--proposals', int)[0],
                         rpn_proposals_test=_pair(args.proposals, '--proposals', int)[1],
                         roi_batch_per_image=args.roi_batch,
                         soft_labels={'enabled': args.soft_labels, 'threshold': args.soft_threshold,
                                      'temperature': args.soft_temperature,
                                      'instance_prototypes': True, 'background_key': True,
                                      'warmup_iterations': args.soft_warmup, 'ramp_iterations': args.soft_ramp})
    data_files = [_resolve_data(path) for path in args.data]
    parts = [CocoFlakeDataset(data_file, args.images, config.input_size, config.pixel_scale,
                              None if args.no_augment else Augmentation(), args.drop_annotations,
                              materials, args.seed + k, class_agnostic=config.class_agnostic)
             for k, data_file in enumerate(data_files)]
    dataset = torch.utils.data.ConcatDataset(parts)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(args.seed))
    val_loader = None
    if args.val is not None:
        val_set = CocoFlakeDataset(_resolve_data(args.val), None, config.input_size, config.pixel_scale,
                                   None, 0.0, materials, args.seed + 1, class_agnostic=config.class_agnostic)
        val_loader = torch.utils.data.DataLoader(val_set, batch_size=args.batch_size, collate_fn=collate)
    model = build_model(config, pretrained_backbone=False if args.no_imagenet else None)
    init_note = 'imagenet-mobilenet_v2' if (args.backbone == 'mobilenet_v2_fpn' and not args.no_imagenet) \
        else 'random'
    if args.init is not None:
        from flake_detector.maskrcnn.model import load_matching_weights
        skipped = load_matching_weights(model, args.init)
        init_note = f'{args.init} ({len(skipped)} tensors not matched)'
    model.to(args.device)
    out = args.out
    last = out / 'last.pt'
    start_stage, start_epoch, history = 0, 0, []
    optimizer_state = None
    if args.resume:
        if not last.is_file():
            raise FileNotFoundError(f'--resume: no {last} to continue from')
        payload = load_checkpoint(last)
        model.load_state_dict(payload['model'])
        state = payload['training_state']
        start_stage, start_epoch, history = state['stage'], state['epoch'], state['history']
        optimizer_state = state['optimizer']
        torch.set_rng_state(state['torch_rng'])
        _reseed(parts, state['data_seed'])
        print(f'resuming at stage {start_stage + 1} epoch {start_epoch + 1}', flush=True)
    first_command = None
    if args.resume:
        earlier = payload.get('card', {})
        first_command = earlier.get('first_command') or earlier.get('command')
    card_base = {
        'command': 'flake-train-maskrcnn ' + ' '.join(argv),
        'data': [str(f) for f in data_files], 'data_images': len(dataset),
        'data_annotations': sum(p.total_annotations for p in parts),
        'dropped_annotation_fraction': args.drop_annotations, 'materials': list(materials or MATERIALS),
        'seed': args.seed, 'init': init_note, 'commit': git_commit(),
        'stages': [f'{s.trainable}:{s.learning_rate:g}:{s.epochs or args.epochs_per_stage}' for s in stages],
        'epochs_per_stage': args.epochs_per_stage, 'iterations_per_epoch': args.iterations_per_epoch,
        'batch_size': args.batch_size, 'loss_weights': LOSS_WEIGHTS, 'augmentation': not args.no_augment,
        'input_size': config.input_size, 'pixel_scale': config.pixel_scale, 'backbone': config.backbone,
        'soft_labels': config.soft_labels, 'class_names': list(config.class_names),
        'warmup_iterations': args.warmup_iterations, 'threads': args.threads,
    }
    if first_command and first_command != card_base['command']:
        card_base['first_command'] = first_command  # resumed with another command line: the card says both
    cpu_started = time.process_time()
    cpu_before = history[-1].get('cpu_seconds', 0.0) if history else 0.0
    stage_epochs = [s.epochs or args.epochs_per_stage for s in stages]
    total_epochs = sum(stage_epochs)
    for stage_index in range(start_stage, len(stages)):
        stage = stages[stage_index]
        set_trainable(model, stage.trainable)
        optimizer = make_optimizer(model, stage.learning_rate)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
            optimizer_state = None
        first_epoch = start_epoch if stage_index == start_stage else 0
        for epoch in range(first_epoch, stage_epochs[stage_index]):
            global_epoch = sum(stage_epochs[:stage_index]) + epoch + 1
            metrics = _run_epoch(model, optimizer, loader, args.iterations_per_epoch,
                                 f'stage {stage_index + 1}/{len(stages)} {stage.trainable} '
                                 f'epoch {global_epoch}/{total_epochs}', args.device,
                                 (global_epoch - 1) * args.iterations_per_epoch, args.warmup_iterations)
            if val_loader is not None:
                metrics['val_loss'] = validation_loss(model, val_loader)
            metrics.update(stage=stage_index + 1, trainable=stage.trainable, lr=stage.learning_rate,
                           epoch=global_epoch, iterations=global_epoch * args.iterations_per_epoch,
                           cpu_seconds=round(time.process_time() - cpu_started + cpu_before, 1))
            history.append(metrics)
            next_stage, next_epoch = (stage_index, epoch + 1)
            if next_epoch >= stage_epochs[stage_index]:
                next_stage, next_epoch = stage_index + 1, 0
            data_seed = int(parts[0].rng.integers(2 ** 63))
            _reseed(parts, data_seed)
            training_state = {'stage': next_stage, 'epoch': next_epoch, 'history': history,
                              'optimizer': optimizer.state_dict() if next_stage == stage_index else None,
                              'torch_rng': torch.get_rng_state(), 'data_seed': data_seed}
            card = dict(card_base, created=dt.datetime.now(dt.UTC).isoformat(timespec='seconds'),
                        epochs_done=global_epoch, metrics=metrics, history=history)
            save_checkpoint(last, model, config, card, training_state=training_state)
            if args.keep_epochs:
                save_checkpoint(out / f'epoch_{global_epoch:03d}.pt', model, config, card, half=True)
            print(f'epoch {global_epoch}/{total_epochs}: loss {metrics["loss"]:.4f}'
                  + (f' val {metrics["val_loss"]:.4f}' if 'val_loss' in metrics else '')
                  + f' soft-labelled negatives {metrics["soft_fraction"]:.3%}', flush=True)
    card = json.loads(last.with_suffix('.json').read_text()) if last.is_file() else dict(card_base)
    if card.get('command') != card_base['command']:
        card['first_command'] = card.get('first_command', card.get('command'))
    card.update(command=card_base['command'], stages=card_base['stages'],
                created=dt.datetime.now(dt.UTC).isoformat(timespec='seconds'))
    card = save_checkpoint(out / 'final.pt', model, config, card)
    print(f'wrote {out / "final.pt"} ({card["model_version"]})')
    if args.export is not None:
        card = save_checkpoint(args.export, model, config, dict(card, history=card.get('history', [])[-5:]),
                               half=True)
        print(f'exported {args.export} ({card["model_version"]}, '
              f'{args.export.stat().st_size / 1e6:.1f} MB float16)')
    return 0


def _run_epoch(model, optimizer, loader, iterations: int, description: str, device: str,
               first_iteration: int = 0, warmup_iterations: int = 0) -> dict:
    sums: dict[str, float] = {}
    base_rates = [group['lr'] for group in optimizer.param_groups]
    soft = 0.0
    started = time.monotonic()
    progress = tqdm(total=iterations, desc=description, unit='it', leave=False, file=sys.stderr,
                    disable=None)
    done = 0
    while done < iterations:
        for images, targets in loader:
            images = [im.to(device) for im in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            iteration = first_iteration + done
            model.rpn.iteration = iteration
            ramp = min(1.0, (iteration + 1) / warmup_iterations) if warmup_iterations > 0 else 1.0
            for group, rate in zip(optimizer.param_groups, base_rates, strict=True):
                group['lr'] = rate * ramp
            losses = train_step(model, optimizer, images, targets)
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value
            soft += model.rpn.last_soft_fraction
            done += 1
            progress.update(1)
            progress.set_postfix(loss=f'{losses["total"]:.3f}')
            if progress.disable and done % 20 == 0:  # no terminal: a plain progress line instead of a bar
                print(f'{description}: {done}/{iterations} it, loss {losses["total"]:.3f}, '
                      f'{(time.monotonic() - started) / done:.1f} s/it', flush=True)
            if done >= iterations:
                break
    progress.close()
    for group, rate in zip(optimizer.param_groups, base_rates, strict=True):
        group['lr'] = rate
    metrics = {name: value / max(done, 1) for name, value in sums.items()}
    metrics['loss'] = metrics.pop('total', math.nan)
    metrics['soft_fraction'] = soft / max(done, 1)
    metrics['seconds'] = round(time.monotonic() - started, 1)
    return metrics


if __name__ == '__main__':
    sys.exit(main())
