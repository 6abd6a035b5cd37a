"""``flake-finetune``: adapt a trained detector to a lab's own microscope from a few labelled images.

    flake-finetune --base graphene-1-10L --coco my_lab/annotations.json --out my_lab/cascade.pt
    flake-finetune --base graphene-1-10L --crops data/labelled_crops/20270101T120000 --out my_lab/cascade.pt
    flake-finetune --coco nbse2/train.json --material nbse2 --layers 1-5 --group-pattern 'flake\\d+' \\
        --out my_lab/cascade_nbse2.pt

Data, any mix:
  --coco FILE   COCO instances of the lab's images (polygons or RLE). Material and layers come
                from each annotation's ``attributes`` (as ``flake-sim dataset`` writes them),
                else from the category's name (a material, or a layer count such as ``3L``,
                where ``>5L`` means thicker than any finite range), else ``--material``.
  --crops DIR   labelled crops, ``DIR/good`` and ``DIR/bad``: what the web app's labels export
                to (``flake_registry.labelling.export_labelled_crops``).

The cascade backend starts from a trained cascade (``--base``: a shipped target or a weights
file), runs the candidate finder over the images, labels each candidate for the target
(``--material``/``--layers`` change the base's), holds out ``--holdout`` of the images
(grouped by ``--group-pattern``, so views of one flake stay together) and of the crops,
and goes on training every net of the cascade at a small learning rate, with balanced
batches, the six rotations and mirrors of each good crop and a random gamma
(``--gamma-jitter``). With at least 5 good held-out candidates the operating point is then
re-chosen there for ``--recall`` (folded into the nets, ``refold_thresholds``). It prints
the held-out funnel before and after and writes the weights (.pt) and a model card (.json):
base model, data, counts, steps, held-out figures, command, commit. A few images train in
CPU minutes (``--threads``).

The maskrcnn backend (``flake_detector.maskrcnn.finetune``) goes on training the class-agnostic
Mask R-CNN (``--base``: a .pt checkpoint, else the shipped one) on the COCO files' images for
``--steps`` steps (600) at ``--lr`` (2e-3), with
``--input-scale`` putting a lab's flakes at the size the network learned, and writes the
checkpoint and its model card.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
import re
import sys
import time

import numpy as np

from flake_detector.candidates import CandidateFinder
from flake_detector.cascade import TARGETS, Cascade, Target, shipped_model
from flake_detector.cascade_train import (
    CropSet,
    _git_commit,
    coco_frames,
    crops_from_folder,
    crops_from_frames,
    refold_thresholds,
    train_net,
)


def image_groups(coco_path: Path, pattern: str | None) -> dict[str, list[int]]:
    """Image ids of a COCO file grouped by the first match of ``pattern`` in the file name
    (each image its own group without a pattern, or when it does not match)."""
    coco = json.loads(Path(coco_path).read_text())
    regex = re.compile(pattern) if pattern else None
    groups: dict[str, list[int]] = {}
    for image in coco['images']:
        name = Path(image['file_name']).name
        match = regex.search(name) if regex else None
        groups.setdefault(match.group(0) if match else name, []).append(image['id'])
    return groups


def split_groups(groups: dict[str, list[int]], holdout: float, rng: np.random.Generator
                 ) -> tuple[list[int], list[int], list[str]]:
    """(training ids, held-out ids, held-out group names): ``holdout`` of the groups (at least
    one when there are two or more, none when ``holdout`` is 0)."""
    names = sorted(groups)
    count = 0 if holdout <= 0 or len(names) < 2 else min(len(names) - 1, max(1, round(holdout * len(names))))
    held = sorted(rng.permutation(names)[:count].tolist())
    train = [i for n in names if n not in held for i in groups[n]]
    return train, [i for n in held for i in groups[n]], held


def split_crops(data: CropSet, holdout: float, rng: np.random.Generator) -> tuple[CropSet, CropSet]:
    """Random share ``holdout`` of good and of bad crops held out (crops carry no flake names)."""
    held = np.zeros(len(data), dtype=bool)
    for label in (0, 1):
        idx = rng.permutation(np.nonzero(data.labels == label)[0])
        held[idx[:int(round(holdout * len(idx)))]] = True
    return CropSet(data.crops[~held], data.labels[~held]), CropSet(data.crops[held], data.labels[held])


def concat(sets: list[CropSet], crop_size: int) -> CropSet:
    sets = [s for s in sets if len(s)]
    if not sets:
        return CropSet(np.zeros((0, crop_size, crop_size, 3), np.uint8), np.zeros(0, np.int64))
    return CropSet(np.concatenate([s.crops for s in sets]), np.concatenate([s.labels for s in sets]))


def funnel(cascade: Cascade, data: CropSet) -> dict:
    """Good kept, bad removed and precision of ``cascade`` on labelled crops."""
    if not len(data):
        return {'candidates': 0}
    accepted, _, _ = cascade.run(data.crops)
    good, bad = data.labels == 1, data.labels == 0
    kept = int((accepted & good).sum())
    return {'candidates': len(data), 'good': int(good.sum()), 'good_kept': kept,
            'bad_removed': int((~accepted & bad).sum()), 'bad': int(bad.sum()),
            'recall': round(kept / max(1, int(good.sum())), 4),
            'precision': round(kept / int(accepted.sum()), 4) if accepted.any() else None}


def finetune_cascade(cascade: Cascade, train: CropSet, steps: int = 150, lr: float = 3e-4, batch: int = 64,
                     seed: int = 0, gamma_jitter: float = 0.3, evaluation: CropSet | None = None,
                     log=None) -> list[dict]:
    """Go on training every net of ``cascade`` on ``train`` (in place); one report per net."""
    if train.good == 0 or train.bad == 0:
        raise ValueError(f'fine-tuning needs good and bad examples; have {train.good} good, {train.bad} bad')
    evaluation = evaluation if evaluation is not None and len(evaluation) else train
    reports = []
    for k, net in enumerate(cascade.nets):
        if log:
            log(f'net {k + 1}/{len(cascade.nets)}: {steps} steps on {train.good} good and {train.bad} bad crops')
        _, report = train_net(train, evaluation, seed=seed * 100 + k, batch=batch, max_steps=steps, lr=lr,
                              eval_every=max(1, steps // 5), net_input=cascade.net_input, net=net,
                              gamma_jitter=gamma_jitter, log=log)
        net.eval()
        reports.append({key: report[key] for key in ('steps', 'eval_accuracy', 'eval_size')})
    return reports


def _layers(text: str) -> tuple[float, float]:
    match = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+|inf))?\s*', text)
    if not match:
        raise argparse.ArgumentTypeError(f'layers are a range like 1-10 (or 1-inf, or one count), got {text!r}')
    low = float(match.group(1))
    high = low if match.group(2) is None else float(match.group(2))
    if high < low:
        raise argparse.ArgumentTypeError(f'empty layer range {text!r}')
    return low, high


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f'must lie within 0..1 (excluding 1), got {text}')
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='flake-finetune', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--backend', choices=('cascade', 'maskrcnn'), default='cascade')
    parser.add_argument('--base', default='graphene-1-10L',
                        help=f'model to start from: a shipped target ({", ".join(sorted(TARGETS))}) or a weights file')
    parser.add_argument('--coco', type=Path, action='append', default=[], help='COCO file of labelled images')
    parser.add_argument('--crops', type=Path, action='append', default=[],
                        help='folder of labelled crops (good/, bad/), as the web app exports them')
    parser.add_argument('--material', default=None,
                        help='material of the labelled flakes where the labels do not name one; also the '
                             'target\'s material')
    parser.add_argument('--layers', type=_layers, default=None, help='layer range of a good flake, e.g. 1-10')
    parser.add_argument('--min-area', type=int, default=None, help='smallest good flake [px] (default: the base\'s)')
    parser.add_argument('--holdout', type=_fraction, default=0.25,
                        help='share of images (groups) and crops held out for the operating point and the figures')
    parser.add_argument('--group-pattern', default=None,
                        help='regular expression naming the flake in a file name (e.g. "flake\\d+"): images of '
                             'one flake are held out together')
    parser.add_argument('--steps', type=int, default=None,
                        help='training steps (default: cascade 150 per net, maskrcnn 600)')
    parser.add_argument('--lr', type=float, default=None, help='learning rate (default: cascade 3e-4, maskrcnn 2e-3)')
    parser.add_argument('--batch', type=int, default=64, help='balanced batch size (default 64)')
    parser.add_argument('--gamma-jitter', type=float, default=0.3,
                        help='random gamma within [1/(1+j), 1+j] on training crops (default 0.3)')
    parser.add_argument('--recall', type=float, default=0.95,
                        help='share of good held-out candidates the cascade must keep (operating point)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--threads', type=int, default=2, help='torch CPU threads (default 2)')
    parser.add_argument('--input-scale', type=float, default=0.0,
                        help='maskrcnn: model pixels per image pixel, so the lab\'s flakes take the size the network '
                             'learned (a 150x frame into the 10x model: about 0.2; 0 = the base model\'s)')
    parser.add_argument('--out', type=Path, required=True, help='weights file (.pt); the card goes next to it')
    return parser


# Schedules measured to suit each backend: the cascade's small nets on crops, the Mask R-CNN
# on 256 px windows of a few images (docs/maskrcnn.md, few-shot fine-tuning).
BACKEND_DEFAULTS = {'cascade': {'steps': 150, 'lr': 3e-4}, 'maskrcnn': {'steps': 600, 'lr': 2e-3}}


def _fail(message: str) -> SystemExit:
    return SystemExit(f'flake-finetune: error: {message}')


def _maskrcnn(args, argv: list[str], log) -> int:
    from flake_detector.maskrcnn import finetune as maskrcnn_finetune

    if args.crops or not args.coco:
        raise _fail('the maskrcnn backend learns from --coco files (masks), not --crops')
    try:
        path = maskrcnn_finetune.finetune(coco=[str(p) for p in args.coco], out=str(args.out), base=args.base,
                                          steps=args.steps, lr=args.lr, seed=args.seed, threads=args.threads,
                                          material=args.material, input_scale=args.input_scale, log=log,
                                          command=' '.join(['flake-finetune', *argv]))
    except (ValueError, OSError) as exc:
        raise _fail(str(exc)) from exc
    log(f'wrote {path}')
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    argv = list(argv if argv is not None else sys.argv[1:])

    def log(text):
        print(f'[flake-finetune] {text}', file=sys.stderr, flush=True)

    if not (args.coco or args.crops):
        parser.error('give labelled data: --coco FILE or --crops DIR')
    for path in args.coco:
        if not path.is_file():
            parser.error(f'no COCO file at {path}')
    for folder in args.crops:
        if not folder.is_dir():
            parser.error(f'no crops folder at {folder}')
    defaults = BACKEND_DEFAULTS[args.backend]
    args.steps = defaults['steps'] if args.steps is None else args.steps
    args.lr = defaults['lr'] if args.lr is None else args.lr
    if args.steps < 1 or args.batch < 2 or not args.lr > 0:
        parser.error('--steps must be >= 1, --batch >= 2 and --lr > 0')
    if not 0.0 < args.recall <= 1.0:
        parser.error(f'--recall must lie in (0, 1], got {args.recall}')
    if args.backend == 'maskrcnn':
        return _maskrcnn(args, argv, log)
    try:
        return _cascade(args, argv, log)
    except (ValueError, OSError, re.error) as exc:
        raise _fail(str(exc)) from exc


def _cascade(args, argv: list[str], log) -> int:
    import torch

    torch.set_num_threads(max(1, args.threads))
    started = time.perf_counter()
    base_path = Path(args.base) if args.base.endswith('.pt') or Path(args.base).is_file() else None
    if base_path is None:
        if args.base not in TARGETS:
            raise ValueError(f'--base is neither a weights file nor a shipped target ({", ".join(sorted(TARGETS))})')
        base_path = shipped_model(args.base)
    cascade = Cascade.load(base_path)
    base_version, base_target = cascade.version, cascade.target
    cascade.card = {}  # the card describes the fine-tuned model; the base is named in it
    target = cascade.target
    if args.material or args.layers or args.min_area is not None:
        material = (args.material or target.material).lower()
        low, high = args.layers or (target.min_layers, target.max_layers)
        name = f'{material}-{low:g}-{high:g}L' if args.layers or material != target.material else target.name
        # A layer range replaces the base's thickness bounds.
        bounds = {} if args.layers else {'min_thickness_nm': target.min_thickness_nm,
                                         'max_thickness_nm': target.max_thickness_nm}
        target = Target(name, material, min_layers=low, max_layers=high,
                        min_area_px=target.min_area_px if args.min_area is None else args.min_area, **bounds)
    cascade.target = target
    finder = CandidateFinder(crop_size=cascade.crop_size)
    rng = np.random.default_rng(args.seed)
    train_sets, held_sets, held_names = [], [], []
    for path in args.coco:
        train_ids, held_ids, names = split_groups(image_groups(path, args.group_pattern), args.holdout, rng)
        train_sets.append(crops_from_frames(coco_frames(path, args.material, train_ids), finder, target))
        held_sets.append(crops_from_frames(coco_frames(path, args.material, held_ids), finder, target))
        held_names += [f'{path.name}:{n}' for n in names]
        log(f'{path}: {len(train_ids)} training images ({train_sets[-1].good} good of {len(train_sets[-1])} '
            f'candidates), {len(held_ids)} held out ({held_sets[-1].good} good of {len(held_sets[-1])})')
    for folder in args.crops:
        train, held = split_crops(crops_from_folder(folder, cascade.crop_size), args.holdout, rng)
        train_sets.append(train)
        held_sets.append(held)
        log(f'{folder}: {len(train)} training crops ({train.good} good), {len(held)} held out ({held.good} good)')
    train, held = concat(train_sets, cascade.crop_size), concat(held_sets, cascade.crop_size)
    if train.good < 1 or train.bad < 1:
        raise ValueError(f'the training part has {train.good} good and {train.bad} bad candidates '
                         f'for target {target.name}; label more flakes or check --material/--layers')
    before = funnel(cascade, held)
    data_seconds = time.perf_counter() - started
    reports = finetune_cascade(cascade, train, steps=args.steps, lr=args.lr, batch=args.batch, seed=args.seed,
                               gamma_jitter=args.gamma_jitter, evaluation=held, log=log)
    threshold_choice = {'chosen_on': None, 'note': 'fewer than 5 good held-out candidates: nets decide at 0.5'}
    if held.good >= 5:
        _, shifts, report = refold_thresholds(cascade, held, args.recall)
        threshold_choice = {'chosen_on': 'held-out candidates', 'recall_target': args.recall,
                            'shifts_folded': [round(t, 6) for t in shifts], 'validation': report,
                            'note': 'the held-out figures after fine-tuning are on the data the operating '
                                    'point was chosen on'}
    after = funnel(cascade, held)
    cascade.version = f'{base_version}+{target.name}-finetuned-{dt.date.today().isoformat()}'
    card = {
        'command': 'flake-finetune ' + ' '.join(argv), 'commit': _git_commit(),
        'created': dt.datetime.now(dt.UTC).isoformat(timespec='seconds'),
        'finetuned_from': {'weights': base_path.name, 'version': base_version, 'target': base_target.to_json()},
        'data': {'coco': [str(p) for p in args.coco], 'crops': [str(p) for p in args.crops],
                 'material': args.material, 'training_candidates': len(train), 'training_good': train.good,
                 'held_out_candidates': len(held), 'held_out_good': held.good, 'held_out_groups': held_names},
        'training': {'steps': args.steps, 'lr': args.lr, 'batch': args.batch, 'gamma_jitter': args.gamma_jitter,
                     'seed': args.seed, 'nets_report': reports, 'data_seconds': round(data_seconds, 1),
                     'train_seconds': round(time.perf_counter() - started - data_seconds, 1)},
        'threshold_choice': threshold_choice,
        'held_out': {'before': before, 'after': after},
        'torch': __import__('torch').__version__,
    }
    path = cascade.save(args.out, card)
    print('| held-out candidates | good | recall | precision |\n|---|---|---|---|')
    for label, figures in (('base', before), ('fine-tuned', after)):
        if figures.get('candidates'):
            precision = '-' if figures['precision'] is None else f'{figures["precision"]:.2f}'
            print(f'| {label} ({figures["candidates"]}) | {figures["good"]} | {figures["recall"]:.2f} | {precision} |')
        else:
            print(f'| {label} | no held-out candidates | - | - |')
    log(f'wrote {path} and {path.with_suffix(".json")} in {time.perf_counter() - started:.0f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
