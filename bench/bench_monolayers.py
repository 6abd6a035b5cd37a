"""Monolayers at 10x and at 50x: what the optics allow, what the detector sees, what revisits recover.

    python bench/bench_monolayers.py [--seeds 31,32,33,34] [--region-mm 1,2,4,5] [--revisits 60]

Three tables, each on fresh simulated chips (90 nm oxide, the demo's camera at 5 ms):

1. Physics of a monolayer of each material: its model contrast, the camera's noise per pixel
   on the bare substrate, the pixels of a 20 um^2 flake at 10x and 50x, and the signal to
   noise over such a flake; the nearest other class of the four materials in colour.
2. A frame centred on every true monolayer of at least 20 um^2 (most of each chip), at 10x and at 50x, through
   the optical detector (all four materials): the detection covering most of the monolayer's
   visible pixels (at least half of them) calls it mono of the right material, another layer
   class or another material; or no detection covers half of it (not found).
3. The scan as the system runs it, without ROS: a 10x serpentine scan of the region into a
   real registry (SQLite), the registry's revisit list (the default policy: thinnest first,
   then largest, then most isolated), a 50x frame centred on each listed flake whose
   detections go into the same registry, then monolayer and thin recall per material before
   and after the revisits (docs/system.md's scoring: flakes of 1-40 layers, >= 20 um^2,
   wholly inside the region). ``--policy score`` ranks the revisit list by detector score
   instead (the order before the monolayer-first policy). Detections smaller than
   ``--min-area-um2`` (detector_node's min_area_um2, 10 in config/demo.yaml) are dropped at both
   magnifications, as the node drops them.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
import math
from pathlib import Path
import sys
import tempfile
import time

import numpy as np

from flake_core import materials
from flake_core.materials import LAYER_CLASS_NAMES, MATERIAL_NAMES, label
from flake_core.objectives import objective_by_name
from flake_detector.detection import make_detector
from flake_detector.optical import thin_film_contrast
from flake_registry.image_import import sightings_of
from flake_registry.revisit import RevisitPolicy, revisit_list
from flake_registry.store import FlakeStore
from flake_scanner.demo.metrics import FoundFlake, score_scan, targets_in_region, truth_in_region
from flake_scanner.scan.planner import Region, plan_serpentine
from flake_scanner.scan.tiler import bin_frame
from flake_scanner.sim.camera import CameraModel, CameraSettings
from flake_scanner.sim.wafer import VirtualWafer

MATERIALS = ('graphene', 'hbn', 'mos2', 'wte2')
OXIDE_NM = 90.0
EXPOSURE_S = 0.005          # config/demo.yaml
PIXEL_PITCH_M = 5.5e-6
TARGET_AREA = 20e-12
MIN_SCORE = 0.4             # registry_node revisit_min_score
MIN_AREA_UM2 = 10.0         # detector_node min_area_um2 in config/demo.yaml


def camera(wafer: VirtualWafer, objective: str, seed: int) -> CameraModel:
    return CameraModel(wafer, CameraSettings(objective=objective, exposure_s=EXPOSURE_S, seed=seed,
                                             pixel_pitch_um=PIXEL_PITCH_M * 1e6))


def pixel_size(objective: str) -> float:
    return PIXEL_PITCH_M / objective_by_name(objective).magnification


def substrate_noise(seed: int) -> float:
    """Relative noise of one pixel on bare substrate (std / mean, the noisiest channel)."""
    wafer = VirtualWafer.generate(seed=seed, oxide_nm=OXIDE_NM, flake_density_per_mm2=0.0,
                                  residue_line_density_per_mm2=0.0, residue_network_density_per_mm2=0.0,
                                  dust_density_per_mm2=0.0, bulk_density_per_mm2=0.0)
    frame = camera(wafer, '10x', seed).render(*wafer.wafer_to_stage.apply(5e-3, 5e-3)).astype(np.float64)
    centre = frame[448:576, 448:576].reshape(-1, 3)
    return float((centre.std(axis=0) / centre.mean(axis=0)).max())


def physics_table(seed: int) -> list[str]:
    noise = substrate_noise(seed)
    classes = {(m, n): np.array(thin_film_contrast(m, n, OXIDE_NM)) for m in MATERIALS for n in range(1, 41)}
    rows = ['| monolayer | contrast (R, G, B) | strongest channel | noise per pixel | pixels of 20 um^2 at 10x / 50x '
            '| signal/noise per pixel | over a 20 um^2 flake at 10x / 50x | nearest other class (colour distance) |',
            '|---|---|---|---|---|---|---|---|']
    px10, px50 = TARGET_AREA / pixel_size('10x') ** 2, TARGET_AREA / pixel_size('50x') ** 2
    for material in MATERIALS:
        contrast = classes[(material, 1)]
        strongest = float(np.abs(contrast).max())
        nearest = min(((k, float(np.linalg.norm(v - contrast))) for k, v in classes.items()
                       if k != (material, 1)), key=lambda item: item[1])
        snr = strongest / noise
        rows.append(f'| {label(material)} | {", ".join(f"{c:+.3f}" for c in contrast)} | {strongest:.3f} | '
                    f'{noise:.3f} | {px10:.0f} / {px50:.0f} | {snr:.1f} | {snr * math.sqrt(px10):.0f} / '
                    f'{snr * math.sqrt(px50):.0f} | {label(nearest[0][0])} {nearest[0][1]}L ({nearest[1]:.3f}) |')
    return rows


def called(detections, visible: np.ndarray) -> tuple[str, str] | None:
    """(material, layer class) of the detection covering most of a flake's visible pixels, when it
    covers at least half of them; None when no detection does."""
    best, best_cover = None, 0
    for det in detections:
        x, y, w, h = det.bbox
        cover = int(np.count_nonzero(visible[y:y + h, x:x + w] & det.mask))
        if cover > best_cover:
            best, best_cover = det, cover
    if best is None or best_cover < 0.5 * np.count_nonzero(visible):
        return None
    return best.material, LAYER_CLASS_NAMES.get(best.layer_class, 'unknown')


def centred_frames_table(seeds: list[int], region, detector) -> list[str]:
    counts: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for seed in seeds:
        wafer = VirtualWafer.generate(seed=seed, oxide_nm=OXIDE_NM)
        monolayers = [t for t in truth_in_region(wafer, *region, min_area=TARGET_AREA, max_layers=1)]
        for objective in ('10x', '50x'):
            model = camera(wafer, objective, seed)
            for truth in monolayers:
                stage = wafer.wafer_to_stage.apply(*truth.centre)
                frame = model.render(*stage)
                visible = next((o.mask for o in model.ground_truth(*stage).objects if o.object_id == truth.object_id),
                               None)
                if visible is None or not visible.any():
                    continue
                found = called(detector.detect(frame).detections, visible)
                outcome = ('not found' if found is None else 'mono' if found == (truth.material, 'mono')
                           else 'wrong material' if found[0] != truth.material else 'other class')
                counts[(truth.material, objective)][outcome] += 1
                counts[(truth.material, objective)]['true'] += 1
    rows = ['| monolayer | objective | true | called mono | another layer class | another material | not found |',
            '|---|---|---|---|---|---|---|']
    for material in MATERIALS:
        for objective in ('10x', '50x'):
            c = counts[(material, objective)]
            rows.append(f'| {label(material)} | {objective} | {c["true"]} | {c["mono"]} | {c["other class"]} | '
                        f'{c["wrong material"]} | {c["not found"]} |')
    return rows


def published(detections, pixel_to_wafer, min_area: float) -> list:
    """The detections detector_node publishes with ``min_area_um2``: at least ``min_area`` [m^2]."""
    return [d for d in detections if d.area_px * pixel_to_wafer.scale ** 2 >= min_area]


def scan_into(store: FlakeStore, wafer: VirtualWafer, seed: int, region, detector, chip_id: str, scan_id: str,
              min_area: float = MIN_AREA_UM2 * 1e-12) -> int:
    """A 10x serpentine scan of ``region`` (10 % overlap) into ``store``; the number of frames."""
    model = camera(wafer, '10x', seed)
    width, height = model.field_of_view
    tiles = plan_serpentine(Region(*region), width, height, 0.1, wafer.wafer_to_stage)
    for tile in tiles:
        frame = model.render(tile.stage_x, tile.stage_y)
        to_wafer = model.pixel_to_wafer(tile.stage_x, tile.stage_y)
        detections = published(detector.detect(frame).detections, to_wafer, min_area)
        store.ingest(sightings_of(detections, to_wafer, frame.shape[:2], chip_id, scan_id, tile.index, time.time(),
                                  'contrast'))
    return len(tiles)


def revisit_into(store: FlakeStore, wafer: VirtualWafer, seed: int, detector, flakes, chip_id: str, scan_id: str,
                 first_index: int, binning: int = 2, min_area: float = MIN_AREA_UM2 * 1e-12
                 ) -> list[tuple[tuple[float, float], list]]:
    """A 50x frame centred on each flake, binned as tiler_node bins revisits; its detections go into
    ``store`` as the revisit's sightings.

    Returns each revisit's stage position and detections in full-frame pixels (for the reasons of
    what was missed).
    """
    model = camera(wafer, '50x', seed)
    seen = []
    for number, flake in enumerate(flakes):
        stage = wafer.wafer_to_stage.apply(flake.x, flake.y)
        frame, to_wafer = bin_frame(model.render(*stage), model.pixel_to_wafer(*stage), binning)
        detections = published(detector.detect(frame).detections, to_wafer, min_area)
        seen.append((stage, [unbinned(d, binning) for d in detections]))
        store.ingest(sightings_of(detections, to_wafer, frame.shape[:2], chip_id, scan_id,
                                  first_index + number, time.time(), 'contrast'))
        store.add_image(flake.id, 'revisit', f'revisits/{flake.id}.png', objective='50x',
                        pixel_size=pixel_size('50x'))
    return seen


def unbinned(detection, binning: int):
    """A detection of a binned frame in the frame's own pixels (for comparing with the truth's masks)."""
    if binning <= 1:
        return detection
    from dataclasses import replace

    x, y, _, _ = detection.bbox
    mask = np.repeat(np.repeat(detection.mask, binning, axis=0), binning, axis=1)
    return replace(detection, bbox=(x * binning, y * binning, mask.shape[1], mask.shape[0]), mask=mask)


def why_missed(wafer: VirtualWafer, seed: int, truth, revisits, noise: float) -> str:
    """Why a true monolayer is not in the registry as one, after the revisits."""
    if np.abs(thin_film_contrast(truth.material, 1, OXIDE_NM)).max() < noise:
        return 'contrast below the noise of one pixel'
    model = camera(wafer, '50x', seed)
    for stage, detections in revisits:
        visible = next((o.mask for o in model.ground_truth(*stage).objects if o.object_id == truth.object_id), None)
        if visible is None or np.count_nonzero(visible) < 0.5 * truth.area / pixel_size('50x') ** 2:
            continue
        outcome = called(detections, visible)
        if outcome is None:
            return '50x revisit: no detection covers it'
        if outcome[0] == materials.UNKNOWN:
            return '50x revisit: inside an unknown-colour region'
        if outcome[0] != truth.material:
            return f'50x revisit: called {label(outcome[0])} {outcome[1]}'
        return f'50x revisit: called {outcome[1]}'
    return 'no revisit frame holds it (nothing listed within 50 um at 10x)'


def registry_score(store: FlakeStore, chip_id: str, truth, too_small, region):
    found = [FoundFlake(f.id, f.material, LAYER_CLASS_NAMES.get(f.layer_class, 'unknown'), (f.x, f.y), f.area,
                        f.score) for f in store.iter_flakes(chip_id=chip_id)]
    return score_scan(found, truth, region=region, ignored=too_small)


def scan_table(seeds: list[int], region, detector, revisits: int, policy_name: str, binning: int = 2,
               min_area: float = MIN_AREA_UM2 * 1e-12) -> list[str]:
    before, after = defaultdict(lambda: np.zeros(6, int)), defaultdict(lambda: np.zeros(6, int))
    precision = {'before': [0, 0], 'after': [0, 0]}
    listed_total = 0
    reasons: dict[tuple[str, str], int] = defaultdict(int)
    noise = substrate_noise(seeds[0])
    policy = RevisitPolicy() if policy_name == 'thinnest' else RevisitPolicy.parse(
        '*: mono, few, thick, bulk', 'best_score', 0.0)
    min_score = MIN_SCORE if policy_name == 'thinnest' else 0.8
    with tempfile.TemporaryDirectory() as folder:
        for seed in seeds:
            chip, scan = f'chip-{seed}', f'scan-{seed}'
            store = FlakeStore(Path(folder) / f'registry-{seed}.sqlite')
            wafer = VirtualWafer.generate(seed=seed, oxide_nm=OXIDE_NM)
            truth, too_small = targets_in_region(wafer, *region)
            frames = scan_into(store, wafer, seed, region, detector, chip, scan, min_area)
            for name, table in (('before', before), ('after', after)):
                if name == 'after':
                    listed = revisit_list(store, policy, chip_id=chip, scan_id=scan, min_score=min_score,
                                          limit=revisits)
                    listed_total += len(listed)
                    captured = revisit_into(store, wafer, seed, detector, listed, chip, scan, frames, binning,
                                            min_area)
                score = registry_score(store, chip, truth, too_small, region)
                if name == 'after':
                    found = {}
                    for flake in store.iter_flakes(chip_id=chip):
                        target = score.matches.get(flake.id)
                        if target is not None:
                            found.setdefault(target, set()).add(LAYER_CLASS_NAMES.get(flake.layer_class))
                    for target in truth:
                        if target.layers == 1 and 'mono' not in found.get(target.object_id, ()):
                            reasons[(target.material, why_missed(wafer, seed, target, captured, noise))] += 1
                for material, s in score.per_material.items():
                    if material == materials.UNKNOWN:
                        continue  # candidates of no material claim no flake: left out of precision
                    table[material] += [s.mono_right, s.mono_true, s.thin_right, s.thin_true, s.matched_found,
                                        s.found]
                    precision[name][0] += s.matched_found
                    precision[name][1] += s.found
            store.close()
    rows = [f'Revisit policy: {policy.describe()}; up to {revisits} flakes per chip, {listed_total} revisited '
            f'in all, 50x frames binned {binning} x {binning}, detections of at least {min_area / 1e-12:g} um^2 at '
            'both magnifications.', '',
            '| material | monolayers called mono, 10x scan | after the 50x revisits | thin (1-10 layers) called '
            'mono or few, 10x scan | after the revisits | precision 10x / after |', '|---|---|---|---|---|---|']
    for material in sorted(set(before) | set(after)):
        b, a = before[material], after[material]
        rows.append(f'| {label(material)} | {_ratio(b[0], b[1])} | {_ratio(a[0], a[1])} | {_ratio(b[2], b[3])} | '
                    f'{_ratio(a[2], a[3])} | {_fraction(b[4], b[5])} / {_fraction(a[4], a[5])} |')
    b, a = sum(before.values()), sum(after.values())
    rows.append(f'| all | {_ratio(b[0], b[1])} | {_ratio(a[0], a[1])} | {_ratio(b[2], b[3])} | {_ratio(a[2], a[3])} | '
                f'{_fraction(*precision["before"])} / {_fraction(*precision["after"])} |')
    rows += ['', 'Monolayers not called mono after the revisits, and why:', '', '| material | why | monolayers |',
             '|---|---|---|']
    rows += [f'| {label(material)} | {reason} | {count} |' for (material, reason), count in sorted(reasons.items())]
    return rows


def _ratio(right: int, true: int) -> str:
    return f'{right}/{true} ({right / true:.2f})' if true else '-'


def _fraction(right: int, total: int) -> str:
    return f'{right / total:.2f}' if total else '-'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--seeds', default='31,32,33,34', help='simulator chips (fresh: not the demo\'s seed 7)')
    parser.add_argument('--region-mm', default='1,2,4,5', help='scanned region min_x,min_y,max_x,max_y [mm]')
    parser.add_argument('--centred-region-mm', default='0.5,0.5,9.5,9.5',
                        help='where the monolayers of table 2 are taken from [mm] (most of the chip)')
    parser.add_argument('--revisits', type=int, default=60, help='flakes revisited per chip')
    parser.add_argument('--policy', choices=('thinnest', 'score'), default='thinnest')
    parser.add_argument('--revisit-binning', type=int, default=2, help='as tiler_node\'s revisit_binning')
    parser.add_argument('--tables', default='physics,centred,scan', help='which tables to print')
    parser.add_argument('--min-area-um2', type=float, default=MIN_AREA_UM2,
                        help='smallest detection reported, at 10x and 50x alike (detector_node min_area_um2)')
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(',')]
    region = tuple(float(v) * 1e-3 for v in args.region_mm.split(','))
    detector = make_detector('contrast', materials=','.join(MATERIALS), oxide_nm=OXIDE_NM)
    tables = set(args.tables.split(','))
    assert set(MATERIALS) <= set(MATERIAL_NAMES)
    started = time.perf_counter()
    if 'physics' in tables:
        print('\n'.join(physics_table(seeds[0])) + '\n', flush=True)
    if 'centred' in tables:
        centred = tuple(float(v) * 1e-3 for v in args.centred_region_mm.split(','))
        print('\n'.join(centred_frames_table(seeds, centred, detector)) + '\n', flush=True)
    if 'scan' in tables:
        print('\n'.join(scan_table(seeds, region, detector, args.revisits, args.policy, args.revisit_binning,
                                          args.min_area_um2 * 1e-12)) + '\n',
              flush=True)
    print(f'seeds {args.seeds}, region {args.region_mm} mm, {time.perf_counter() - started:.0f} s', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
