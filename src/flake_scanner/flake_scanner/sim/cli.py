"""flake-sim: render single frames or COCO datasets from the simulated microscope.

    flake-sim render --seed 3 --x 6.2 --y 4.1 --objective 20x --out frame.png --truth truth.json
    flake-sim dataset --seed 3 --frames 200 --objective 10x --out data/sim_train --thin-fraction 0.5
    flake-sim dataset --seed 3 --frames 200 --randomise-camera --out data/sim_random
    flake-sim render --seed 3 --x 6.2 --y 4.1 --look all235 --out frame.png
    flake-sim compare --real real_285nm.jpg real_90nm.jpg --out docs/img/sim_vs_real.png
    flake-sim looks --out docs/img/sim_looks.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
import sys

import cv2
import numpy as np

from flake_core.objectives import OBJECTIVES
from flake_scanner.sim.camera import CameraModel, CameraSettings
from flake_scanner.sim.coco import FrameRecord, frames_to_coco
from flake_scanner.sim.randomise import SimLook, default_look, held_out_looks, look_by_name, look_groups, random_look
from flake_scanner.sim.wafer import VirtualWafer, WaferConfig


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be >= 1, got {value}')
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f'must be within 0..1, got {value}')
    return value


def _objective(text: str) -> str:
    if text.lower() not in OBJECTIVES:
        raise argparse.ArgumentTypeError(f'unknown objective {text!r}; choose one of {", ".join(OBJECTIVES)}')
    return text.lower()


def _oxide(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and 10.0 <= value <= 2000.0):
        raise argparse.ArgumentTypeError(f'oxide must lie within 10..2000 nm, got {text}')
    return value


def _look(text: str) -> SimLook:
    try:
        return look_by_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--seed', type=int, default=0, help='wafer and camera seed (default 0)')
    parser.add_argument('--objective', type=_objective, default='10x', help=f'one of {", ".join(OBJECTIVES)}')
    parser.add_argument('--oxide', type=_oxide, default=90.0, help='SiO2 thickness [nm] (default 90)')
    parser.add_argument('--width', type=_positive_int, default=1024, help='image width [px]')
    parser.add_argument('--height', type=_positive_int, default=1024, help='image height [px]')
    parser.add_argument('--density', type=float, default=20.0, help='flakes per mm^2 (default 20)')
    parser.add_argument('--thin-fraction', type=_fraction, default=0.0,
                        help='share of flakes forced to 1-10 layers (enriches thin flakes for training)')
    names = ', '.join(look.name for look in held_out_looks())
    parser.add_argument('--look', type=_look, default=None,
                        help=f'camera and chip look: default, a held-out camera ({names}) or random:SEED; '
                             'its oxide, when it sets one, replaces --oxide')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='flake-sim', description='Simulated optical microscope of 2D flakes.')
    sub = parser.add_subparsers(dest='command', required=True)

    render = sub.add_parser('render', help='render one frame (and optionally its ground truth)')
    _add_common(render)
    render.add_argument('--x', type=float, required=True, help='stage x of the image centre [mm]')
    render.add_argument('--y', type=float, required=True, help='stage y of the image centre [mm]')
    render.add_argument('--z', type=float, default=None,
                        help='stage z [um]; default: the focal plane (in focus)')
    render.add_argument('--defocus', type=float, default=0.0, help='offset from the focal plane [um]')
    render.add_argument('--wafer-frame', action='store_true',
                        help='--x/--y are chip (wafer-frame) coordinates instead of stage coordinates')
    render.add_argument('--out', type=Path, required=True, help='output image (.png)')
    render.add_argument('--truth', type=Path, default=None, help='write ground truth as COCO JSON here')

    dataset = sub.add_parser('dataset', help='render N frames with COCO annotations')
    _add_common(dataset)
    dataset.add_argument('--frames', type=_positive_int, required=True, help='number of frames')
    dataset.add_argument('--out', type=Path, required=True, help='output directory')
    dataset.add_argument('--empty-fraction', type=_fraction, default=0.15,
                         help='share of frames at random places (often empty or contaminants only)')
    dataset.add_argument('--defocus-spread', type=float, default=0.0,
                         help='random defocus, standard deviation in depths of field (augmentation)')
    dataset.add_argument('--randomise-camera', action='store_true',
                         help='a new random look (camera, oxide 80-300 nm, shading, dirt, noise) every '
                              '--frames-per-look frames, seeded by --seed; held-out cameras are never drawn')
    dataset.add_argument('--frames-per-look', type=_positive_int, default=8,
                         help='frames per random look (default 8)')
    dataset.add_argument('--include-held-out', action='store_true',
                         help='with --randomise-camera: draw from the held-out intervals too')

    looks = sub.add_parser('looks', help='one field through the default, the held-out and random looks (picture)')
    looks.add_argument('--seed', type=int, default=4, help='wafer seed (default 4)')
    looks.add_argument('--random', type=_positive_int, default=7, help='random looks to show (default 7)')
    looks.add_argument('--tile', type=_positive_int, default=256, help='tile size [px] (default 256)')
    looks.add_argument('--out', type=Path, required=True, help='output picture (.png or .jpg)')

    compare = sub.add_parser('compare', help='a rendered frame next to a real micrograph (look check)')
    compare.add_argument('--seed', type=int, default=4, help='wafer seed (default 4)')
    compare.add_argument('--real', type=Path, nargs='+', required=True,
                         help='real micrographs; one row each, rendered on 285 nm then 90 nm SiO2')
    compare.add_argument('--out', type=Path, required=True, help='output picture (.png)')
    return parser


def _busiest_field(camera: CameraModel, kinds: tuple[str, ...]) -> tuple[float, float]:
    """Of the fields centred on bulk crystals, the one with most area of ``kinds``."""
    wafer = camera.wafer
    w, h = wafer.config.chip_width_m, wafer.config.chip_height_m
    candidates = [o for o in wafer.objects_in_rect(0.2 * w, 0.2 * h, 0.8 * w, 0.8 * h) if o.kind == 'bulk'][:40]
    best, best_score = wafer.wafer_to_stage.apply(w / 2, h / 2), -1
    for obj in candidates:
        x, y = wafer.wafer_to_stage.apply(*obj.centre)
        score = sum(o.area_px for o in camera.ground_truth(x, y).objects if o.kind in kinds)
        if score > best_score:
            best, best_score = (x, y), score
    return best


def _compare(args) -> int:
    rows = []
    tile = (640, 400)
    for index, path in enumerate(args.real):
        real = cv2.imread(str(path))
        if real is None:
            raise SystemExit(f'flake-sim: error: cannot read image {path}')
        oxide = 285.0 if index % 2 == 0 else 90.0
        wafer = VirtualWafer.generate(WaferConfig(seed=args.seed + index, oxide_nm=oxide,
                                                  flake_density_per_mm2=40, bulk_density_per_mm2=10))
        # 1920x1200 at about 0.39 um/px like the real set; on 285 nm a gamma-encoded camera exposed
        # like the real one, on 90 nm the linear default camera.
        look = dict(gamma=2.2, substrate_level=0.42) if oxide == 285.0 else {}
        camera = CameraModel(wafer, CameraSettings(width=1920, height=1200, objective='20x', pixel_pitch_um=7.8,
                                                   seed=args.seed, **look))
        rendered = camera.render(*_busiest_field(camera, ('bulk', 'flake', 'terrace')))
        gap = np.full((tile[1], 6, 3), 255, np.uint8)
        rows.append(np.hstack([cv2.resize(real, tile, interpolation=cv2.INTER_AREA), gap,
                               cv2.resize(rendered, tile, interpolation=cv2.INTER_AREA)]))
        print(f'row {index + 1}: {path.name} | simulated, {oxide:g} nm SiO2', file=sys.stderr)
    spacer = np.full((6, rows[0].shape[1], 3), 255, np.uint8)
    picture = rows[0]
    for row in rows[1:]:
        picture = np.vstack([picture, spacer, row])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(args.out), picture):
        raise SystemExit(f'flake-sim: error: cannot write {args.out}')
    print(f'wrote {args.out}')
    return 0


def _looks(args) -> int:
    """The same field of one chip through the default camera, the held-out cameras and random looks."""
    looks = [default_look(), *held_out_looks(), *(random_look([args.seed, g]) for g in range(args.random))]
    tiles = []
    for look in looks:
        wafer = VirtualWafer.generate(look.wafer_config(seed=args.seed, chip_width_m=3e-3, chip_height_m=3e-3,
                                                        flake_density_per_mm2=60, thin_fraction=0.5))
        camera = CameraModel(wafer, look.camera_settings(CameraSettings(width=512, height=512, objective='10x',
                                                                        seed=args.seed)))
        tile = cv2.resize(camera.render(*wafer.wafer_to_stage.apply(1.5e-3, 1.5e-3)), (args.tile, args.tile),
                          interpolation=cv2.INTER_AREA)
        label = f'{look.name}, {look.oxide_nm:g} nm'
        (text_w, text_h), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
        cv2.rectangle(tile, (0, 0), (text_w + 10, text_h + 10), (40, 40, 40), -1)
        cv2.putText(tile, label, (5, text_h + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(tile)
        print(f'{look.name}: {look.description or "oxide " + format(look.oxide_nm, "g") + " nm"}', file=sys.stderr)
    columns = 4
    tiles += [np.full_like(tiles[0], 255)] * (-len(tiles) % columns)
    picture = np.vstack([np.hstack(tiles[i:i + columns]) for i in range(0, len(tiles), columns)])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(args.out), picture):
        raise SystemExit(f'flake-sim: error: cannot write {args.out}')
    print(f'wrote {args.out}')
    return 0


def _make_camera(args, look: SimLook | None = None, wafer_seed: int | None = None) -> CameraModel:
    look = look or args.look or SimLook('default')
    wafer = VirtualWafer.generate(look.wafer_config(seed=args.seed if wafer_seed is None else wafer_seed,
                                                    oxide_nm=args.oxide, flake_density_per_mm2=args.density,
                                                    thin_fraction=args.thin_fraction))
    return CameraModel(wafer, look.camera_settings(CameraSettings(
        width=args.width, height=args.height, objective=args.objective,
        seed=args.seed if wafer_seed is None else wafer_seed)))


def frame_extra(camera: CameraModel, look: SimLook | None) -> dict:
    """What a COCO image entry records of how the frame was rendered: the oxide, the camera
    response (what a calibration should recover) and the look."""
    extra = {'oxide_nm': camera.wafer.config.oxide_nm, 'camera_response': camera.response.as_dict()}
    if look is not None:
        extra['look'] = look.as_dict()
    return extra


def _render(args) -> int:
    camera = _make_camera(args)
    wafer = camera.wafer
    x, y = args.x * 1e-3, args.y * 1e-3
    if args.wafer_frame:
        wx, wy = x, y
        x, y = wafer.wafer_to_stage.apply(wx, wy)
    else:
        wx, wy = wafer.stage_to_wafer.apply(x, y)
    if not wafer.contains(wx, wy):
        w, h = wafer.config.chip_width_m * 1e3, wafer.config.chip_height_m * 1e3
        corners = ', '.join(f'({cx * 1e6:.1f}, {cy * 1e6:.1f})' for cx, cy in wafer.corner_positions_stage())
        raise SystemExit(f'flake-sim: error: position is off the {w:g} x {h:g} mm chip (chip coordinates '
                         f'{wx * 1e6:.1f}, {wy * 1e6:.1f} µm); stage corners [µm]: {corners}')
    z = camera.focal_plane_z(x, y) if args.z is None else args.z * 1e-6
    z += args.defocus * 1e-6
    image = camera.render(x, y, z)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(args.out), image):
        raise SystemExit(f'flake-sim: error: cannot write image {args.out}')
    print(f'wrote {args.out} ({image.shape[1]}x{image.shape[0]}, {camera.pixel_size * 1e6:.3f} µm/px, '
          f'stage ({x * 1e6:.1f}, {y * 1e6:.1f}) µm, z {z * 1e6:.2f} µm)')
    if args.truth is not None:
        truth = camera.ground_truth(x, y)
        coco = frames_to_coco([FrameRecord(args.out.name, truth, args.objective,
                                           z - camera.focal_plane_z(x, y), frame_extra(camera, args.look))])
        args.truth.parent.mkdir(parents=True, exist_ok=True)
        args.truth.write_text(json.dumps(coco))
        flakes = sum(not o.is_contaminant for o in truth.objects)
        print(f'wrote {args.truth} ({flakes} flake regions, {len(truth.objects) - flakes} contaminants)')
    return 0


def dataset_positions(camera: CameraModel, frames: int, empty_fraction: float, seed: int) -> list[tuple]:
    """Stage positions: most centred near a flake (thin ones preferred), some at random places."""
    wafer = camera.wafer
    rng = np.random.default_rng([seed, 0xDA7A])
    fov_w, fov_h = camera.field_of_view
    w, h = wafer.config.chip_width_m, wafer.config.chip_height_m
    margin_x, margin_y = min(fov_w / 2, w / 2), min(fov_h / 2, h / 2)
    positions = []
    for index in range(frames):
        centre = np.array([rng.uniform(margin_x, w - margin_x), rng.uniform(margin_y, h - margin_y)])
        if rng.random() >= empty_fraction:
            found = wafer.objects_in_rect(centre[0] - 0.5e-3, centre[1] - 0.5e-3,
                                          centre[0] + 0.5e-3, centre[1] + 0.5e-3)
            flakes = [o for o in found if o.kind in ('flake', 'terrace') and wafer.contains(*o.centre)]
            if flakes:
                thin = [o for o in flakes if o.layers <= 10]
                pool = thin if thin and rng.random() < 0.5 else flakes
                target = np.array(pool[int(rng.integers(len(pool)))].centre)
                # The flake lands anywhere in the middle 60 % of the frame.
                centre = target + rng.uniform(-0.3, 0.3, 2) * (fov_w, fov_h)
        positions.append((index, *wafer.wafer_to_stage.apply(float(centre[0]), float(centre[1]))))
    return positions


def _write_coco(path: Path, coco: dict) -> None:
    partial = path.with_name(path.name + '.partial')
    partial.write_text(json.dumps(coco))
    os.replace(partial, path)


def dataset_looks(args) -> list[tuple[SimLook | None, int, int]]:
    """(look, wafer seed, frames) per group of frames: one group with the chosen look, or a new
    random look every --frames-per-look frames."""
    if not args.randomise_camera:
        return [(args.look, args.seed, args.frames)]
    try:
        return look_groups(args.seed, args.frames, args.frames_per_look, held_out=not args.include_held_out)
    except ValueError as exc:
        raise SystemExit(f'flake-sim: error: {exc}') from exc


def _dataset(args) -> int:
    out = args.out
    image_dir = out / 'images'
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([args.seed, 0xDEF0])
    # Frames are encoded as they come: a set of hundreds of frames keeps no masks (nor, with
    # --randomise-camera, cameras) of earlier ones in memory.
    coco = frames_to_coco([], description=f'flake-sim seed {args.seed} objective {args.objective}')
    step = max(1, args.frames // 20)
    index = 0
    for look, wafer_seed, count in dataset_looks(args):
        camera = _make_camera(args, look, wafer_seed)
        extra = frame_extra(camera, look)
        for _, x, y in dataset_positions(camera, count, args.empty_fraction, wafer_seed):
            offset = float(rng.normal(0.0, args.defocus_spread)) * camera.objective.depth_of_field_m
            z = camera.focal_plane_z(x, y) + offset
            name = f'images/{args.seed:04d}_{index:06d}.png'
            if not cv2.imwrite(str(out / name), camera.render(x, y, z)):
                raise SystemExit(f'flake-sim: error: cannot write {out / name}')
            frame = frames_to_coco([FrameRecord(name, camera.ground_truth(x, y), args.objective, offset, extra)])
            image_id = len(coco['images']) + 1
            coco['images'].append({**frame['images'][0], 'id': image_id})
            for annotation in frame['annotations']:
                coco['annotations'].append({**annotation, 'id': len(coco['annotations']) + 1, 'image_id': image_id})
            index += 1
            if index % step == 0 or index == args.frames:
                # Checkpoint: a run killed half-way still leaves valid annotations for its images.
                _write_coco(out / 'annotations.json', coco)
                print(f'[flake-sim] {index}/{args.frames} frames', file=sys.stderr, flush=True)
    flakes = sum(not a['is_contaminant'] for a in coco['annotations'])
    print(f'wrote {index} images and {out / "annotations.json"} '
          f'({flakes} flake regions, {len(coco["annotations"]) - flakes} contaminants)')
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == 'compare':
        return _compare(args)
    if args.command == 'looks':
        return _looks(args)
    if not math.isfinite(args.density) or not 0 <= args.density <= 1e4:
        parser.error(f'--density must be within 0..10000 per mm^2, got {args.density}')
    if args.command == 'render':
        return _render(args)
    if args.defocus_spread < 0:
        parser.error('--defocus-spread must be >= 0')
    return _dataset(args)


if __name__ == '__main__':
    sys.exit(main())
