"""``flake-train-cascade``: train Greplova et al.'s cascade of noisy nets for one target.

Data (any mix):
  --sim-seeds 1,2,3      frames of the simulated microscope (flake_scanner.sim), labelled
                         from its ground truth; evaluation belongs on a seed not listed here
  --coco FILE            a COCO file with flake annotations (attributes: material, layers)
  --crops DIR            labelled crops: DIR/good/*.png and DIR/bad/*.png

Every source goes through the candidate finder (crops excepted), so the nets learn
on what they will see. A candidate is good when a flake the target accepts has its
centroid inside the candidate's region and covers at least a fifth of it (isolated,
not the rim of a bulk crystal). Simulated frames are centred near flakes of a chip
enriched in thin flakes (``--thin-fraction``, where the good ones are) and, with
``--natural-frames``, of a chip of the same seed with natural statistics, which brings
the near misses a scan meets (graphene of 11-30 layers, hBN just off 10-90 nm).

Training follows Greplova et al. (2020): balanced batches (half good, half bad), each good crop in
6 variants (rotations and mirrors), three nets trained separately. Greplova et al. (2020) stops
each net while still noisy (~90 % accuracy on a balanced batch); on simulated
candidates that point comes after some 20 steps, when a net still passes 4-7 % of the
bad candidates, so the nets train ``--max-steps`` steps (``--stop-accuracy`` restores
the early stop). Each net's threshold is then chosen on a validation seed that no
training or evaluation uses (``--val-seed``) so that the cascade keeps ``--recall`` of
its good candidates, and folded into the net (``Cascade.fold_thresholds``). Writes the
weights (.pt) and a model card (.json) with the thresholds and the validation funnel.
With a few dozen good validation candidates a 95 % choice is a coin toss on a fresh
seed, so validation takes several seeds (``--val-seeds``), each with thin-rich and
natural-statistics frames (``--val-natural-frames``), for hundreds of good candidates.

``--rethreshold`` trains nothing: it loads the cascades already at ``--out`` and
re-chooses their operating point on the validation data. On nets that carry folded
thresholds a new choice is one more shift of each net's output bias, so the card
records the shift and the threshold it adds up to on the trained nets.

Shipped weights: ``flake-train-cascade --target graphene-1-10L,hbn-10-90nm --sim-seeds 1,2,3
--sim-frames 100 --natural-frames 60 --max-steps 300 --val-seeds 4,5,6 --val-frames 100
--val-natural-frames 60 --recall 0.95 --out src/flake_detector/flake_detector/models``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
import datetime as dt
import json
import math
from pathlib import Path
import re
import subprocess
import sys
import time

import cv2
import numpy as np

from flake_core import materials
from flake_core.materials import FLAKE_MATERIALS
from flake_detector.candidates import Candidate, CandidateFinder
from flake_detector.cascade import TARGETS, Cascade, Target, build_net, logit, target_by_name


@dataclass
class TruthObject:
    """A ground-truth flake region, from the simulator or a COCO file."""

    material: str
    layers: float
    thickness_nm: float
    area_px: float
    centre_px: tuple[float, float]
    # False where no camera could see it: its physical contrast is below VISIBLE_CONTRAST in every
    # channel (thin graphene on 130-190 nm of oxide). Candidates on such a flake are not labelled.
    visible: bool = True


# Smallest physical contrast (any channel) at which a flake counts as seen.
VISIBLE_CONTRAST = 0.03


@dataclass
class CropSet:
    crops: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray  # (N,) 1 = good, 0 = bad, -1 = not labelled (an invisible good flake)

    @property
    def good(self) -> int:
        return int((self.labels == 1).sum())

    @property
    def bad(self) -> int:
        return int((self.labels == 0).sum())

    def __len__(self) -> int:
        return len(self.labels)


def label_candidates(candidates: list[Candidate], truths: list[TruthObject], target: Target,
                     slack_px: int = 3, min_share: float = 0.2) -> np.ndarray:
    """1 where a flake the target accepts has its centroid in the candidate's region box
    (grown by ``slack_px``) and covers at least ``min_share`` of the region; -1 (not
    labelled) where the only such flakes are invisible (``TruthObject.visible``).

    The share stands for Greplova et al.'s "isolated": a thin flake on the rim of a bulk
    crystal puts its centroid in the crystal's candidate, but that crop shows the
    crystal, and the flake is not one a lab would pick up.
    """
    labels = np.zeros(len(candidates), dtype=np.int64)
    goods = [t for t in truths if target.accepts(t.material, t.layers, t.thickness_nm, t.area_px)]
    for k, c in enumerate(candidates):
        x, y, w, h = c.bbox
        region = max(1, c.area_px)
        for t in goods:
            u, v = t.centre_px
            if (x - slack_px <= u < x + w + slack_px and y - slack_px <= v < y + h + slack_px
                    and t.area_px >= min_share * region):
                labels[k] = 1 if t.visible else -1
                if t.visible:
                    break
    return labels


def simulated_frames(seed: int, count: int, size: int = 1024, thin_fraction: float = 0.5,
                     oxide_nm: float = 90.0, objective: str = '10x', chip_mm: float = 4.0,
                     material_mix: dict | None = None, look=None, randomise: bool = False,
                     frames_per_look: int = 10, with_truth: bool = False):
    """``count`` frames (bgr, [TruthObject], pixel_to_wafer) of a simulated chip, each
    centred near a random flake so the rare good flakes are not rarer still. With
    ``with_truth`` the third item is the frame's ``FrameTruth`` (masks; its ``pixel_to_wafer``).

    ``look`` (a ``flake_scanner.sim.randomise.SimLook``) renders with another camera and chip
    look; ``randomise`` draws a new random look every ``frames_per_look`` frames (never one
    of the held-out cameras), each on its own chip."""
    if randomise:
        from flake_scanner.sim.randomise import look_groups

        for group_look, wafer_seed, group_count in look_groups(seed, count, frames_per_look):
            yield from simulated_frames(wafer_seed, group_count, size, thin_fraction, oxide_nm, objective,
                                        chip_mm, material_mix, look=group_look, with_truth=with_truth)
        return
    from flake_scanner.sim.camera import CameraModel, CameraSettings
    from flake_scanner.sim.randomise import SimLook
    from flake_scanner.sim.wafer import VirtualWafer

    look = look or SimLook('default')
    extra = {'material_mix': material_mix} if material_mix else {}
    wafer = VirtualWafer.generate(look.wafer_config(seed=seed, oxide_nm=oxide_nm, thin_fraction=thin_fraction,
                                                    chip_width_m=chip_mm * 1e-3, chip_height_m=chip_mm * 1e-3,
                                                    **extra))
    camera = CameraModel(wafer, look.camera_settings(CameraSettings(width=size, height=size, objective=objective,
                                                                    seed=seed)))
    rng = np.random.default_rng([seed, 0xCA5C])
    fov = camera.field_of_view
    margin = 0.1e-3
    flakes = [o for o in wafer.flakes() if margin < o.centre[0] < chip_mm * 1e-3 - margin
              and margin < o.centre[1] < chip_mm * 1e-3 - margin]
    if not flakes:
        raise ValueError(f'simulated chip of seed {seed} has no flakes')
    for _ in range(count):
        centre = np.array(flakes[int(rng.integers(len(flakes)))].centre)
        centre = centre + rng.uniform(-0.3, 0.3, 2) * np.array(fov)
        x, y = wafer.wafer_to_stage.apply(float(centre[0]), float(centre[1]))
        truth = camera.ground_truth(x, y)
        objects = [TruthObject(o.material, float(o.layers), float(o.thickness_nm), float(o.area_px),
                               _mask_centre(o.mask),
                               bool(np.abs(camera.contrast(wafer.object_by_id(o.object_id))).max() >= VISIBLE_CONTRAST))
                   for o in truth.flakes]
        yield camera.render(x, y), objects, truth if with_truth else truth.pixel_to_wafer


def _mask_centre(mask: np.ndarray) -> tuple[float, float]:
    vs, us = np.nonzero(mask)
    return (float(us.mean()), float(vs.mean())) if len(us) else (math.nan, math.nan)


_LAYER_NAME = re.compile(r'^\s*(>=|\u2265|>)?\s*(\d+)\s*(l|layers?)\s*$', re.IGNORECASE)


def layers_from_name(name: str) -> float:
    """Layer count of a category named like ``3L`` or ``5 layers``; ``>5L`` and ``>=5L`` say only
    'thick' and read as infinity (thicker than any finite layer range); NaN for other names."""
    match = _LAYER_NAME.match(str(name))
    if not match:
        return math.nan
    return math.inf if match.group(1) else float(match.group(2))


def coco_frames(path: Path, material: str | None = None, image_ids=None):
    """(bgr, [TruthObject], None) for every image of a COCO file (those of ``image_ids`` only,
    when given). Material and layers come from each annotation's ``attributes`` (as
    ``flake-sim dataset`` writes them), else from the category's name (a material name, or a
    layer count like ``3L`` as labelling tools write them), else ``material``. Masks may be
    RLE or polygons."""
    from pycocotools import mask as mask_utils

    path = Path(path)
    coco = json.loads(path.read_text())
    categories = {c['id']: c['name'] for c in coco.get('categories', [])}
    by_image: dict[int, list[dict]] = {}
    for ann in coco['annotations']:
        if ann.get('is_contaminant') or ann.get('category_id', 0) >= 100:
            continue
        by_image.setdefault(ann['image_id'], []).append(ann)
    wanted = None if image_ids is None else set(image_ids)
    for image in coco['images']:
        if wanted is not None and image['id'] not in wanted:
            continue
        bgr = cv2.imread(str(path.parent / image['file_name']), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f'cannot read {image["file_name"]} listed in {path}')
        height, width = bgr.shape[:2]
        objects = []
        for ann in by_image.get(image['id'], []):
            attributes = ann.get('attributes') or {}
            seg = ann.get('segmentation')
            if isinstance(seg, dict) or (isinstance(seg, list) and seg):
                if isinstance(seg, dict):
                    rle = dict(seg)
                    if isinstance(rle['counts'], str):
                        rle['counts'] = rle['counts'].encode('ascii')
                else:
                    rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
                centre = _mask_centre(mask_utils.decode(rle).astype(bool))
            else:
                x, y, w, h = ann['bbox']
                centre = (x + w / 2, y + h / 2)
            category = categories.get(ann.get('category_id'), '')
            name = attributes.get('material') or (category if category in FLAKE_MATERIALS else None) \
                or material or 'unknown'
            layers = float(attributes['layers']) if attributes.get('layers') is not None \
                else layers_from_name(category)
            thickness = attributes.get('thickness_nm')
            if thickness is None:
                # Targets may bound the thickness: a layer count gives it.
                thickness = layers * materials.material(name).layer_nm if name in FLAKE_MATERIALS else math.nan
            objects.append(TruthObject(str(name), layers, float(thickness), float(ann.get('area', 0.0)), centre))
        yield bgr, objects, None


def crops_from_frames(frames, finder: CandidateFinder, target: Target | list[Target],
                      progress: str = '') -> CropSet | list[CropSet]:
    """Candidates of every frame, labelled for ``target`` (a CropSet), or for each of a
    list of targets (a list of CropSets sharing one array of crops): frames are
    rendered and searched once however many targets are trained."""
    targets = target if isinstance(target, list) else [target]
    crops, labels = [], []
    for index, (image, truths, to_wafer) in enumerate(frames, start=1):
        candidates = finder.find(image, to_wafer)
        crops.append(finder.crops(image, candidates))
        labels.append(np.stack([label_candidates(candidates, truths, t) for t in targets], axis=1)
                      if candidates else np.zeros((0, len(targets)), np.int64))
        if progress and index % 25 == 0:
            print(f'[{progress}] {index} frames, {sum(len(c) for c in crops)} candidates, good per target '
                  f'{[int(v) for v in sum((lab == 1).sum(axis=0) for lab in labels)]}', file=sys.stderr, flush=True)
    if crops:
        all_crops, all_labels = np.concatenate(crops), np.concatenate(labels)
    else:
        all_crops = np.zeros((0, finder.crop_size, finder.crop_size, 3), np.uint8)
        all_labels = np.zeros((0, len(targets)), np.int64)
    sets = [CropSet(all_crops, all_labels[:, k]) for k in range(len(targets))]
    return sets if isinstance(target, list) else sets[0]


def crops_from_folder(folder: Path, crop_size: int) -> CropSet:
    crops, labels = [], []
    for label, name in ((1, 'good'), (0, 'bad')):
        files = sorted((folder / name).glob('*.png')) + sorted((folder / name).glob('*.jpg'))
        for f in files:
            image = cv2.imread(str(f), cv2.IMREAD_COLOR)
            if image is None:
                raise ValueError(f'cannot read crop {f}')
            crops.append(cv2.resize(image, (crop_size, crop_size), interpolation=cv2.INTER_AREA))
            labels.append(label)
    if not crops:
        raise ValueError(f'no crops in {folder}/good or {folder}/bad')
    return CropSet(np.stack(crops), np.array(labels, np.int64))


def six_variants(crops: np.ndarray) -> np.ndarray:
    """Greplova et al. (2020): every good crop enters in 6 variants (identity, 3 rotations, 2 mirrors)."""
    return np.concatenate([crops, np.rot90(crops, 1, (1, 2)), np.rot90(crops, 2, (1, 2)),
                           np.rot90(crops, 3, (1, 2)), crops[:, :, ::-1], crops[:, ::-1]])


def split(data: CropSet, eval_fraction: float, rng: np.random.Generator) -> tuple[CropSet, CropSet]:
    """Hold out ``eval_fraction`` of the good crops and as many bad ones: the balanced evaluation batch."""
    good = np.nonzero(data.labels == 1)[0]
    bad = np.nonzero(data.labels == 0)[0]
    n_eval = max(1, int(round(len(good) * eval_fraction)))
    good, bad = rng.permutation(good), rng.permutation(bad)
    eval_idx = np.concatenate([good[:n_eval], bad[:n_eval]])
    train_idx = np.concatenate([good[n_eval:], bad[n_eval:]])
    return (CropSet(data.crops[train_idx], data.labels[train_idx]),
            CropSet(data.crops[eval_idx], data.labels[eval_idx]))


def train_net(train: CropSet, evaluation: CropSet, seed: int, width: float = 1.0, batch: int = 200,
              max_steps: int = 300, stop_accuracy: float | None = None, eval_every: int = 10, lr: float = 1e-3,
              min_steps: int = 20, net_input: int = 40, log=None, net=None, gamma_jitter: float = 0.0):
    """One net: ``max_steps`` balanced batches, or fewer once the evaluation accuracy
    reaches ``stop_accuracy`` (Greplova et al.'s noisy stop; None or 0 trains every step).

    ``net``: go on training this net (fine-tuning) instead of a fresh one. ``gamma_jitter``:
    each training crop seen through a random gamma within [1 / (1 + j), 1 + j] (on its contrast
    image, ``(1 + C) ** g - 1``), for cameras whose tone curve is not known."""
    import torch
    from torch import nn

    from flake_detector.cascade import normalise_crops

    torch.manual_seed(seed)  # each net of a cascade starts from its own initialisation
    rng = np.random.default_rng(seed)
    net = build_net(width) if net is None else net
    good = six_variants(train.crops[train.labels == 1])
    bad = train.crops[train.labels == 0]
    if len(good) == 0 or len(bad) == 0:
        raise ValueError(f'need good and bad crops to train; have {len(good) // 6} good, {len(bad)} bad')
    # Inputs are prepared once at the net's input size; batches then only index them.
    good = normalise_crops(good, net_input)
    bad = normalise_crops(bad, net_input)
    x_eval = torch.from_numpy(normalise_crops(evaluation.crops, net_input))
    y_eval = torch.from_numpy(evaluation.labels)
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    half = batch // 2
    history = []
    accuracy = 0.0
    step = 0
    for step in range(1, max_steps + 1):
        net.train()
        gi = rng.integers(len(good), size=half)
        bi = rng.integers(len(bad), size=batch - half)
        x = torch.from_numpy(np.concatenate([good[gi], bad[bi]]))
        if gamma_jitter > 0:
            gammas = np.exp(rng.uniform(-1.0, 1.0, batch) * math.log1p(gamma_jitter)).astype(np.float32)
            x = (1.0 + x).clamp(min=0.0) ** torch.from_numpy(gammas)[:, None, None, None] - 1.0
        y = torch.cat([torch.ones(half, dtype=torch.long), torch.zeros(batch - half, dtype=torch.long)])
        optimiser.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        optimiser.step()
        if step % eval_every == 0 or step == max_steps:
            net.eval()
            with torch.inference_mode():
                logits = net(x_eval)
                eval_loss = float(loss_fn(logits, y_eval))
                accuracy = float((logits.argmax(1) == y_eval).float().mean())
            history.append({'step': step, 'train_loss': loss.item(), 'eval_loss': eval_loss,
                            'eval_accuracy': accuracy})
            if log:
                log(f'step {step}: train loss {loss.item():.3f}, eval loss {eval_loss:.3f}, '
                    f'eval accuracy {accuracy:.3f}')
            if stop_accuracy and step >= min_steps and accuracy >= stop_accuracy:
                break
    net.eval()
    return net, {'steps': step, 'eval_accuracy': accuracy, 'eval_size': len(evaluation), 'history': history}


def train_cascade(data: CropSet, target: Target, nets: int = 3, seed: int = 0, width: float = 1.0,
                  crop_size: int = 80, eval_fraction: float = 0.1, net_input: int = 40, log=None,
                  **train_kwargs) -> Cascade:
    """Train ``nets`` nets separately, each with its own evaluation batch (Greplova et al. (2020))."""
    models, reports = [], []
    for k in range(nets):
        rng = np.random.default_rng([seed, k])
        train, evaluation = split(data, eval_fraction, rng)
        if log:
            log(f'net {k + 1}/{nets}: {train.good} good and {train.bad} bad training crops, '
                f'evaluation batch {len(evaluation)}')
        net, report = train_net(train, evaluation, seed=seed * 100 + k, width=width, net_input=net_input,
                                log=log, **train_kwargs)
        models.append(net)
        reports.append(report)
    card = {'nets_report': [{k: v for k, v in r.items() if k != 'history'} for r in reports],
            'history': [r['history'] for r in reports]}
    return Cascade(models, target, crop_size=crop_size, card=card, width=width, net_input=net_input)


def choose_threshold(p_good: np.ndarray, recall: float) -> float:
    """A threshold that keeps the smallest share >= ``recall`` of the good crops' P(good)
    (kept: P >= threshold): midway between the lowest score kept and the next one down,
    so no validation crop sits on it; within (0, 1) so it can be folded into a net."""
    if not 0.0 < recall <= 1.0:
        raise ValueError(f'recall must lie in (0, 1], got {recall}')
    scores = np.sort(np.asarray(p_good, dtype=np.float64))[::-1]
    if len(scores) == 0:
        raise ValueError('need good validation crops to choose a threshold')
    keep = max(1, int(math.ceil(recall * len(scores) - 1e-9)))
    below = scores[keep] if keep < len(scores) else 0.0
    return float(np.clip(0.5 * (scores[keep - 1] + below), 1e-4, 1.0 - 1e-4))


def choose_thresholds(cascade: Cascade, validation: CropSet, recall: float) -> tuple[list[float], dict]:
    """One threshold per net, in cascade order, each keeping recall ** (1 / nets) of the
    good validation crops that reach it, so the whole cascade keeps about ``recall``.
    Returns the thresholds and the validation funnel they give."""
    per_net = recall ** (1.0 / len(cascade.nets))
    good = validation.labels == 1
    alive = validation.labels >= 0
    thresholds, funnel = [], [[int(alive.sum()), int(good.sum())]]
    for k in range(len(cascade.nets)):
        p = cascade.probabilities(validation.crops[alive], k)
        thresholds.append(choose_threshold(p[good[alive]], per_net))
        idx = np.nonzero(alive)[0]
        alive[idx[p < thresholds[-1]]] = False
        funnel.append([int(alive.sum()), int((alive & good).sum())])
    bad = validation.bad
    report = {'candidates': int((validation.labels >= 0).sum()), 'good': int(good.sum()), 'recall_target': recall,
              'funnel': funnel, 'good_kept': round(funnel[-1][1] / max(1, funnel[0][1]), 4),
              'bad_removed': round(1.0 - (funnel[-1][0] - funnel[-1][1]) / max(1, bad), 4)}
    return thresholds, report


def refold_thresholds(cascade: Cascade, validation: CropSet, recall: float,
                      folded: list[float] | None = None) -> tuple[list[float], list[float], dict]:
    """Re-choose the operating point of a cascade whose nets already carry ``folded``
    thresholds (None: none folded, 0.5 each) and fold the change into the nets.

    The new choice, made on the folded nets, is a further shift of each output bias:
    thresholds compose by adding logits. Returns the thresholds on the trained nets
    that the nets now carry, the shifts folded now, and the validation report.
    """
    folded = [0.5] * len(cascade.nets) if folded is None else [float(t) for t in folded]
    if len(folded) != len(cascade.nets):
        raise ValueError(f'need one folded threshold per net ({len(cascade.nets)}), got {len(folded)}')
    shifts, report = choose_thresholds(cascade, validation, recall)
    cascade.fold_thresholds(shifts)
    combined = [1.0 / (1.0 + math.exp(-(logit(t) + logit(s)))) for t, s in zip(folded, shifts, strict=True)]
    return combined, shifts, report


def validation_crops(seeds: list[int], frames: int, natural_frames: int, finder: CandidateFinder,
                     targets: list[Target], size: int = 1024, thin_fraction: float = 0.5, oxide_nm: float = 90.0,
                     objective: str = '10x', log=None, randomise: bool = False,
                     frames_per_look: int = 10) -> list[CropSet]:
    """Candidates of every validation seed (thin-rich frames, then natural-statistics
    ones), one CropSet per target."""
    parts = []
    for seed in seeds:
        for label, thin, count in (('', thin_fraction, frames), (' natural', 0.0, natural_frames)):
            if count <= 0:
                continue
            frames_of_seed = simulated_frames(seed, count, size, thin, oxide_nm, objective, randomise=randomise,
                                              frames_per_look=frames_per_look)
            sets = crops_from_frames(frames_of_seed, finder,
                                     targets, progress=f'validation seed {seed}{label}')
            parts.append(sets)
            if log:
                log(f'validation seed {seed}{label}: {len(sets[0])} candidates, good per target '
                    f'{[v.good for v in sets]}')
    if not parts:
        raise ValueError('validation needs at least one seed with frames')
    crops = np.concatenate([p[0].crops for p in parts])
    return [CropSet(crops, np.concatenate([p[k].labels for p in parts])) for k in range(len(targets))]


def _git_commit() -> str:
    try:
        return subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ''


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='flake-train-cascade', description=__doc__.split('\n\n')[0])
    parser.add_argument('--target', default='graphene-1-10L',
                        help=f'one of {sorted(TARGETS)}, or several comma-separated (frames rendered once)')
    parser.add_argument('--target-json', type=Path, default=None,
                        help='a custom target: JSON with name, material, min/max_layers, min/max_thickness_nm')
    parser.add_argument('--sim-seeds', default='', help='comma-separated simulator seeds to train on')
    parser.add_argument('--sim-frames', type=int, default=120, help='frames per simulator seed')
    parser.add_argument('--sim-size', type=int, default=1024, help='simulated frame size [px]')
    parser.add_argument('--thin-fraction', type=float, default=0.5, help='simulator: share of thin flakes')
    parser.add_argument('--natural-frames', type=int, default=0,
                        help='extra frames per simulator seed of a chip with natural statistics (near misses)')
    parser.add_argument('--val-seeds', '--val-seed', dest='val_seeds', default='',
                        help='comma-separated simulator seeds on which each net\'s threshold is chosen '
                             '(none: 0.5 for every net)')
    parser.add_argument('--val-frames', type=int, default=100, help='thin-rich frames per validation seed')
    parser.add_argument('--val-natural-frames', type=int, default=0,
                        help='natural-statistics frames per validation seed (what a scan meets)')
    parser.add_argument('--rethreshold', action='store_true',
                        help='train nothing: re-choose the thresholds of the cascades at --out on the validation '
                             'seeds and write them back')
    parser.add_argument('--recall', type=float, default=0.95,
                        help='share of the good validation candidates the whole cascade must keep')
    parser.add_argument('--oxide', type=float, default=90.0, help='simulator: SiO2 thickness [nm]')
    parser.add_argument('--randomise-camera', action='store_true',
                        help='simulator: a new random camera and chip look (oxide 80-300 nm, white balance, gamma, '
                             'bands, shading, dirt, JPEG) every --frames-per-look frames, for training and '
                             'validation; the held-out cameras are never drawn (replaces --oxide)')
    parser.add_argument('--frames-per-look', type=int, default=10, help='simulator: frames per random look')
    parser.add_argument('--objective', default='10x', help='simulator objective')
    parser.add_argument('--coco', type=Path, action='append', default=[], help='COCO file to train on')
    parser.add_argument('--crops', type=Path, action='append', default=[], help='folder with good/ and bad/')
    parser.add_argument('--nets', type=int, default=3, help='nets in the cascade (Greplova et al. (2020): 3)')
    parser.add_argument('--batch', type=int, default=200, help='balanced batch size (Greplova et al. (2020): 200)')
    parser.add_argument('--max-steps', type=int, default=300, help='training steps per net at most')
    parser.add_argument('--stop-accuracy', type=float, default=0.0,
                        help='stop a net once its balanced evaluation accuracy reaches this '
                             '(Greplova et al. 2020: ~0.9; 0: train every step)')
    parser.add_argument('--crop-size', type=int, default=80)
    parser.add_argument('--width', type=float, default=1.0, help='scale of the layer widths (1 = Table I)')
    parser.add_argument('--seed', type=int, default=0, help='training seed')
    parser.add_argument('--threads', type=int, default=2, help='torch CPU threads')
    parser.add_argument('--out', type=Path, required=True,
                        help='weights file (.pt), or a directory for cascade_<target>.pt files; the card (.json) '
                             'goes next to each')
    return parser


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = build_parser()
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    try:
        if args.target_json:
            targets = [Target.from_json(json.loads(args.target_json.read_text()))]
        else:
            targets = [target_by_name(name.strip()) for name in args.target.split(',') if name.strip()]
    except (ValueError, TypeError, OSError) as exc:
        parser.error(str(exc))
    if len(targets) > 1 and args.crops:
        parser.error('--crops folders hold one target\'s labels; train one target at a time with them')
    try:
        seeds = [int(s) for s in args.sim_seeds.split(',') if s.strip()]
        val_seeds = [int(s) for s in args.val_seeds.split(',') if s.strip()]
    except ValueError as exc:
        parser.error(f'seeds are comma-separated integers: {exc}')
    if not (seeds or args.coco or args.crops or args.rethreshold):
        parser.error('give training data: --sim-seeds, --coco or --crops')
    if set(val_seeds) & set(seeds):
        parser.error(f'validation seeds {sorted(set(val_seeds) & set(seeds))} are also training seeds; '
                     'choose thresholds on fresh ones')
    if args.rethreshold and not val_seeds:
        parser.error('--rethreshold needs --val-seeds')
    if val_seeds and args.val_frames + args.val_natural_frames <= 0:
        parser.error('--val-frames and --val-natural-frames give no validation frames')
    if not 0.0 < args.recall <= 1.0:
        parser.error(f'--recall must lie in (0, 1], got {args.recall}')

    def log(text):
        print(f'[flake-train-cascade] {text}', file=sys.stderr, flush=True)

    def out_path(target: Target) -> Path:
        return args.out / f'cascade_{target.name}.pt' if len(targets) > 1 or args.out.suffix != '.pt' else args.out

    def validation_record(thresholds, report) -> dict:
        return {'val_seeds': val_seeds, 'val_frames': args.val_frames,
                'val_natural_frames': args.val_natural_frames, 'thresholds': [round(t, 6) for t in thresholds],
                'folded_into_output_bias': True, 'validation': report}

    finder = CandidateFinder(crop_size=args.crop_size)
    if args.rethreshold:
        return _rethreshold(args, targets, val_seeds, finder, out_path, validation_record, log,
                            argv if argv is not None else sys.argv[1:])
    started = time.perf_counter()
    randomise = {'randomise': args.randomise_camera, 'frames_per_look': args.frames_per_look}
    parts: list[list[CropSet]] = []  # per source, one CropSet per target
    for seed in seeds:
        frames = simulated_frames(seed, args.sim_frames, args.sim_size, args.thin_fraction, args.oxide,
                                  args.objective, **randomise)
        parts.append(crops_from_frames(frames, finder, targets, progress=f'sim seed {seed}'))
        log(f'sim seed {seed}: {len(parts[-1][0])} candidates, good per target {[p.good for p in parts[-1]]}')
        if args.natural_frames > 0:
            frames = simulated_frames(seed, args.natural_frames, args.sim_size, 0.0, args.oxide, args.objective,
                                      **randomise)
            parts.append(crops_from_frames(frames, finder, targets, progress=f'sim seed {seed} natural'))
            log(f'sim seed {seed}, natural statistics: {len(parts[-1][0])} candidates, good per target '
                f'{[p.good for p in parts[-1]]}')
    for path in args.coco:
        parts.append(crops_from_frames(coco_frames(path), finder, targets, progress=str(path)))
        log(f'{path}: {len(parts[-1][0])} candidates, good per target {[p.good for p in parts[-1]]}')
    for folder in args.crops:
        parts.append([crops_from_folder(folder, args.crop_size)])
        log(f'{folder}: {len(parts[-1][0])} crops, {parts[-1][0].good} good')
    crops = np.concatenate([p[0].crops for p in parts])
    validation = None
    if val_seeds:
        validation = validation_crops(val_seeds, args.val_frames, args.val_natural_frames, finder, targets,
                                      args.sim_size, args.thin_fraction, args.oxide, args.objective, log,
                                      **randomise)
    for k, target in enumerate(targets):
        data = CropSet(crops, np.concatenate([p[k].labels for p in parts]))
        if data.good < 5 or data.bad < 5:
            raise SystemExit(f'flake-train-cascade: error: too few examples for {target.name} ({data.good} good, '
                             f'{data.bad} bad); add frames or lower the target')
        trained = time.perf_counter()
        cascade = train_cascade(data, target, nets=args.nets, seed=args.seed, width=args.width,
                                crop_size=args.crop_size, log=log, batch=args.batch, max_steps=args.max_steps,
                                stop_accuracy=args.stop_accuracy)
        threshold_choice = {'val_seeds': [], 'thresholds': [cascade.threshold] * len(cascade.nets)}
        if validation is not None:
            thresholds, _, report = refold_thresholds(cascade, validation[k], args.recall)
            threshold_choice = validation_record(thresholds, report)
            log(f'{target.name}: thresholds {[round(t, 3) for t in thresholds]} keep {report["good_kept"]:.1%} '
                f'of good and remove {report["bad_removed"]:.1%} of bad validation candidates')
        cascade.version = f'cascade-{target.name}-{dt.date.today().isoformat()}'
        card = {
            'command': 'flake-train-cascade ' + ' '.join(argv if argv is not None else sys.argv[1:]),
            'commit': _git_commit(), 'created': dt.datetime.now(dt.UTC).isoformat(timespec='seconds'),
            'threshold_choice': threshold_choice,
            'data': {'sim_seeds': seeds, 'sim_frames_per_seed': args.sim_frames, 'sim_size': args.sim_size,
                     'natural_frames_per_seed': args.natural_frames,
                     'thin_fraction': args.thin_fraction, 'objective': args.objective,
                     **({'randomised_camera': True, 'frames_per_look': args.frames_per_look,
                         'looks': 'flake_scanner.sim.randomise.random_look([seed, group]), held-out cameras '
                                  'excluded'} if args.randomise_camera else {'oxide_nm': args.oxide}),
                     'coco': [str(p) for p in args.coco], 'crops': [str(p) for p in args.crops],
                     'candidates': len(data), 'good': data.good, 'bad': data.bad,
                     'not_labelled_invisible': int((data.labels < 0).sum())},
            'training': {'batch': args.batch, 'max_steps': args.max_steps, 'stop_accuracy': args.stop_accuracy,
                         'seed': args.seed, 'data_seconds': round(trained - started, 1),
                         'train_seconds': round(time.perf_counter() - trained, 1)},
            'torch': torch.__version__,
        }
        path = cascade.save(out_path(target), card)
        log(f'wrote {path} ({path.stat().st_size / 1e6:.2f} MB) and {path.with_suffix(".json")}')
    return 0


def _rethreshold(args, targets, val_seeds, finder, out_path, validation_record, log, argv) -> int:
    """``--rethreshold``: a new operating point for trained cascades, their nets unchanged."""
    cascades = []
    for target in targets:
        path = out_path(target)
        try:
            cascade = Cascade.load(path)
        except FileNotFoundError as exc:
            raise SystemExit(f'flake-train-cascade: error: {exc}; --rethreshold works on trained cascades') from exc
        if cascade.target.name != target.name:
            raise SystemExit(f'flake-train-cascade: error: {path} holds target {cascade.target.name}, '
                             f'not {target.name}')
        cascades.append((path, cascade))
    validation = validation_crops(val_seeds, args.val_frames, args.val_natural_frames, finder, targets,
                                  args.sim_size, args.thin_fraction, args.oxide, args.objective, log,
                                  randomise=args.randomise_camera, frames_per_look=args.frames_per_look)
    for k, (path, cascade) in enumerate(cascades):
        previous = cascade.card.get('threshold_choice') or {}
        folded = previous.get('thresholds') if previous.get('folded_into_output_bias') else None
        combined, shifts, report = refold_thresholds(cascade, validation[k], args.recall, folded)
        choice = validation_record(combined, report)
        choice['shifts_folded_last'] = [round(t, 6) for t in shifts]
        choice['previous'] = previous
        choice['command'] = 'flake-train-cascade ' + ' '.join(argv)
        choice['commit'] = _git_commit()
        choice['created'] = dt.datetime.now(dt.UTC).isoformat(timespec='seconds')
        log(f'{cascade.target.name}: thresholds {[round(t, 3) for t in combined]} keep {report["good_kept"]:.1%} '
            f'of good and remove {report["bad_removed"]:.1%} of bad validation candidates')
        # The same nets at another operating point detect differently: the version says so.
        cascade.version = f'{cascade.version.split("-recall")[0]}-recall{round(args.recall * 100)}'
        cascade.save(path, {'threshold_choice': choice})
        log(f'wrote {path} and {path.with_suffix(".json")}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
