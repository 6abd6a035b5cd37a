"""``flake-demo`` (``make demo``): scan a simulated chip with the whole node graph.

Brings the graph up (flake-system), measures the chip's three corners, sets the
wafer frame, runs a Scan goal while printing progress, revisits the flakes the
registry lists (thinnest first) at 50x, then scores the registry against the
simulator's ground truth and writes a report folder (index.html leading with the thin
flakes found, the mosaic, the metrics, thickness and area distributions, a gallery).
People read um, um^2, nm and local time; the topics stay in SI units.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import shutil
import subprocess
import sys
import time

import cv2

from flake_core.data_files import data_dir as system_data_dir
from flake_core.data_files import frame_file
from flake_core.geometry import Affine2D
from flake_core.parameters import load_overrides, view
from flake_core.units import UM, local_time
from flake_scanner.demo.metrics import FoundFlake, score_scan, targets_in_region
from flake_scanner.demo.report import ReportFlake, ScanFrameFile, text_summary, write_report
from flake_scanner.graph import config_dir
from flake_scanner.parameters import CameraNodeParameters

LAYER_CLASS_NAMES = {0: 'unknown', 1: 'mono', 2: 'few', 3: 'thick', 4: 'bulk'}


def camera_parameters(params_files: list[Path]) -> CameraNodeParameters:
    """The camera node's parameters as the graph runs it: its defaults, then ``params_files``."""
    return view(CameraNodeParameters, load_overrides(params_files, 'camera_node'))


def sim_wafer(camera: CameraNodeParameters):
    """The virtual chip camera_node renders, rebuilt from the same parameters."""
    from flake_scanner.sim.wafer import VirtualWafer

    return VirtualWafer.generate(seed=camera.sim_seed, oxide_nm=camera.sim_oxide_nm)


def write_ground_truth(wafer, camera: CameraNodeParameters, poses: dict, path: Path) -> None:
    """The simulator's truth for every scan frame, as COCO, so `flake-bag-eval` can score the bag."""
    import json

    from flake_scanner.sim.camera import CameraModel, CameraSettings
    from flake_scanner.sim.coco import frames_to_coco

    records, frame_maps = [], []
    for tile_index in sorted(poses):
        x, y, objective, width, height, pixel_to_wafer = poses[tile_index]
        frame_maps.append(pixel_to_wafer)
        model = CameraModel(wafer, CameraSettings(width=width, height=height, objective=objective,
                                                  pixel_pitch_um=camera.pixel_pitch * 1e6))
        records.append((f'{tile_index:05d}.jpg', model.ground_truth(x, y)))
    coco = frames_to_coco(records)
    # Masks are in frame pixels; the frames place them on the chip with the measured wafer frame.
    for image, pixel_to_wafer in zip(coco['images'], frame_maps):
        image['pixel_to_wafer'] = pixel_to_wafer
    path.write_text(json.dumps(coco))


class ProgressPrinter:
    """One line per second of scan progress, for people watching a terminal; remembers when each
    phase began (the report times the scan and its revisits apart)."""

    def __init__(self, quiet: bool = False):
        self.last = 0.0
        self.quiet = quiet
        self.phase_started: dict[str, float] = {}

    def __call__(self, feedback) -> None:
        now = time.monotonic()
        self.phase_started.setdefault(feedback.phase, now)
        if self.quiet or (now - self.last < 1.0 and feedback.tiles_done != feedback.tiles_total):
            return
        self.last = now
        total = max(1, feedback.tiles_total)
        done = feedback.tiles_done
        bar = '#' * int(30 * done / total) + '.' * (30 - int(30 * done / total))
        if feedback.phase == 'revisit':
            # During revisits the coordinator counts the flakes still to visit.
            left = f'{feedback.eta:4.0f} flakes left to revisit'
        else:
            left = f'ETA {feedback.eta:5.0f} s' if feedback.eta == feedback.eta else 'ETA     ? s'
        print(f'  [{bar}] {feedback.phase:9s} {done:4d}/{feedback.tiles_total:<4d} tiles  '
              f'{feedback.flakes_so_far:4d} detections  {left}', flush=True)


def run_scan(region, chip_id: str, corners, objective: str, detector: str, revisit: int,
             frames_dir: Path | None, timeout: float, focus_strategy: str = '', namespace: str = '',
             registry_namespace: str | None = None, progress: ProgressPrinter | None = None):
    """Set the wafer frame, run the Scan action, then read every flake of the scan back.

    ``revisit``: flakes to revisit (0 none, < 0 as many as the coordinator is configured for).
    ``frames_dir``: where to write the scan's frames as JPEG too (None: only their poses are kept;
    the tiler keeps the frames in the data folder). ``registry_namespace``: where the registry is
    when it is not in ``namespace`` (a facility's microscopes share one at the root: pass '').
    """
    from geometry_msgs.msg import Point
    import rclpy
    from rclpy.action import ActionClient
    from rclpy.executors import SingleThreadedExecutor

    from flake_core.node_tools import PIPELINE_QOS
    from flake_core.ros_image import image_to_numpy
    from flake_msgs.action import Scan
    from flake_msgs.msg import ScanFrame
    from flake_msgs.srv import GetFlake, QueryFlakes, SetWaferFrame

    prefix = ('/' + namespace.strip('/')) if namespace.strip('/') else ''
    registry = namespace if registry_namespace is None else registry_namespace
    registry_prefix = ('/' + registry.strip('/')) if registry.strip('/') else ''
    own_context = not rclpy.ok()
    if own_context:
        rclpy.init()
    node = rclpy.create_node('flake_demo')
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    if frames_dir is not None:
        frames_dir.mkdir(parents=True, exist_ok=True)

    poses = {}

    def save_frame(frame: ScanFrame) -> None:
        if frame.revisit:
            return
        if frames_dir is not None:
            pixels = image_to_numpy(frame.image, 'bgr8')
            cv2.imwrite(str(frames_dir / f'{frame.tile_index:05d}.jpg'), pixels, [cv2.IMWRITE_JPEG_QUALITY, 90])
        poses[frame.tile_index] = (frame.stage_position.x, frame.stage_position.y, frame.objective,
                                   frame.image.width, frame.image.height, list(frame.pixel_to_wafer))

    node.create_subscription(ScanFrame, f'{prefix}/scan/frames', save_frame, PIPELINE_QOS)

    def wait(future, seconds: float, what: str):
        deadline = time.monotonic() + seconds
        while not future.done():
            if time.monotonic() > deadline:
                raise TimeoutError(f'{what} did not finish within {seconds:.0f} s')
            executor.spin_once(timeout_sec=0.1)
        return future.result()

    def ready(client, what: str, seconds: float = 120.0):
        deadline = time.monotonic() + seconds
        check = client.server_is_ready if isinstance(client, ActionClient) else client.service_is_ready
        while not check():
            if time.monotonic() > deadline:
                raise TimeoutError(f'{what} is not available; see the node logs')
            executor.spin_once(timeout_sec=0.1)
        # The request endpoint matches before the reply endpoint does; a call sent in that
        # gap loses its answer, so let discovery finish first.
        settle = time.monotonic() + 0.5
        while time.monotonic() < settle:
            executor.spin_once(timeout_sec=0.05)

    try:
        set_frame = node.create_client(SetWaferFrame, f'{prefix}/scan/set_wafer_frame')
        ready(set_frame, 'scan coordinator')
        request = SetWaferFrame.Request(chip_id=chip_id,
                                        corners=[Point(x=float(x), y=float(y)) for x, y in corners])
        response = wait(set_frame.call_async(request), 30, 'SetWaferFrame')
        if not response.success:
            raise RuntimeError(f'wafer frame refused: {response.message}')
        print(f'wafer frame: {response.message}', flush=True)

        scan = ActionClient(node, Scan, f'{prefix}/scan')
        ready(scan, 'Scan action')
        goal = Scan.Goal(chip_id=chip_id, region_min_x=region[0], region_min_y=region[1],
                         region_max_x=region[2], region_max_y=region[3], objective=objective,
                         detector=detector, revisit=revisit != 0, revisit_max=max(revisit, 0),
                         focus_strategy=focus_strategy)
        printer = progress or ProgressPrinter()
        handle = wait(scan.send_goal_async(goal, feedback_callback=lambda m: printer(m.feedback)), 30, 'Scan goal')
        if not handle.accepted:
            raise RuntimeError('scan goal rejected')
        outcome = wait(handle.get_result_async(), timeout, 'the scan')
        result = outcome.result
        if not result.success:
            raise RuntimeError(f'scan failed: {result.error_code} {result.message}')

        query = node.create_client(QueryFlakes, f'{registry_prefix}/registry/query_flakes')
        ready(query, 'registry')

        def total() -> int:
            answer = wait(query.call_async(QueryFlakes.Request(chip_id=chip_id, limit=1)), 30, 'QueryFlakes')
            return answer.total if answer.success else -1

        # The registry ingests the last detections (the revisits') from its queue: read the
        # flakes once their number has held still for a second.
        count, steady_since, deadline = total(), time.monotonic(), time.monotonic() + 30.0
        while time.monotonic() - steady_since < 1.0 and time.monotonic() < deadline:
            pause = time.monotonic() + 0.25
            while time.monotonic() < pause:
                executor.spin_once(timeout_sec=0.05)
            now = total()
            if now != count:
                count, steady_since = now, time.monotonic()
        flakes = []
        offset = 0
        while True:
            page = wait(query.call_async(QueryFlakes.Request(chip_id=chip_id, limit=500, offset=offset)), 30,
                        'QueryFlakes')
            if not page.success:
                raise RuntimeError(f'registry query failed: {page.message}')
            flakes += page.flakes
            offset += len(page.flakes)
            if not page.flakes or offset >= page.total:
                break
        get = node.create_client(GetFlake, f'{registry_prefix}/registry/get_flake')
        revisit_images, outlines = {}, {}
        stored = system_data_dir()
        for flake in flakes:
            record = wait(get.call_async(GetFlake.Request(flake_id=flake.id)), 30, 'GetFlake')
            outlines[flake.id] = tuple((p.x, p.y) for p in record.flake.contour.points)
            for image in record.images:
                if image.role == 'revisit':
                    # The registry names its images relative to its data folder.
                    path = Path(image.path)
                    revisit_images[flake.id] = (str(path if path.is_absolute() else stored / path), image.pixel_size,
                                                image.objective or '50x')
        report = [ReportFlake(f.id, f.material, LAYER_CLASS_NAMES.get(f.layer_class, 'unknown'), f.layers,
                              f.thickness_nm, f.thickness_nm_std, f.area, f.score, (f.centre.x, f.centre.y),
                              f.tile_index, (f.bbox.x_offset, f.bbox.y_offset, f.bbox.width, f.bbox.height),
                              *_revisit_fields(revisit_images.get(f.id), outlines.get(f.id, ())))
                  for f in flakes]
        return result, report, poses
    finally:
        executor.shutdown()
        node.destroy_node()
        if own_context:
            rclpy.try_shutdown()


def _revisit_fields(revisit, outline) -> tuple:
    """ReportFlake's revisit_image, contour, revisit_pixel_size and revisit_objective."""
    path, pixel_size, objective = revisit or ('', 0.0, '50x')
    return path, outline, pixel_size, objective


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='flake-demo', description=__doc__.split('\n\n')[0])
    parser.add_argument('--report', default='reports/demo', help='report folder (recreated)')
    parser.add_argument('--params-file', default=None,
                        help='parameter overrides for the graph (default: config/demo.yaml)')
    parser.add_argument('--region-mm', default='1.0,2.0,4.0,5.0',
                        help='scan region in the wafer frame: min_x,min_y,max_x,max_y [mm]')
    parser.add_argument('--objective', default='10x')
    parser.add_argument('--detector', default='', help='contrast | cascade | maskrcnn (default: configured)')
    parser.add_argument('--revisit', type=int, default=-1,
                        help='flakes to revisit at 50x, thinnest first (0 = none; default: the scan coordinator\'s '
                             'revisit_max, 60 in config/demo.yaml)')
    parser.add_argument('--chip-id', default='demo-chip')
    parser.add_argument('--timeout', type=float, default=900.0, help='give up on the scan after this [s]')
    parser.add_argument('--record', action='store_true', default=True, help='record the scan to a bag (default)')
    parser.add_argument('--no-record', dest='record', action='store_false')
    args = parser.parse_args(argv)

    try:
        region = tuple(float(v) * 1e-3 for v in args.region_mm.split(','))
        if len(region) != 4 or region[2] <= region[0] or region[3] <= region[1]:
            raise ValueError
    except ValueError:
        parser.error(f'--region-mm needs min_x,min_y,max_x,max_y with max > min, got {args.region_mm!r}')
    configs = config_dir()
    params_file = Path(args.params_file) if args.params_file else configs / 'demo.yaml'
    if not params_file.exists():
        parser.error(f'parameter file {params_file} does not exist')
    report_dir = Path(args.report)
    if report_dir.exists():
        shutil.rmtree(report_dir)
    data_dir = report_dir / 'data'
    data_dir.mkdir(parents=True)
    os.environ['FLAKE_DATA_DIR'] = str(data_dir.resolve())

    camera_params = camera_parameters([configs / 'camera_node.yaml', params_file])
    wafer = sim_wafer(camera_params)
    # An operator measures the corners with the stage; a few micrometres of error.
    corners = wafer.corner_positions_stage(noise_m=2e-6, seed=1)

    from flake_scanner.system import running_system

    print(f'flake-demo: bringing the graph up (logs in {report_dir / "logs"})', flush=True)
    started = time.monotonic()
    progress = ProgressPrinter()
    recorder = None
    with running_system(hardware='sim', params_file=str(params_file), log_dir=report_dir / 'logs',
                        echo=False) as system:
        if args.record and shutil.which('flake-record'):
            recorder = subprocess.Popen(
                ['flake-record', '--output', str(report_dir / 'scan_bag'), '--topics',
                 '/scan/frames', '/detections', '/stage/state', '/registry/events'],
                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        up = time.monotonic() - started
        print(f'flake-demo: graph up in {up:.1f} s; scanning ({region[0] / UM:.0f}, {region[1] / UM:.0f}) to '
              f'({region[2] / UM:.0f}, {region[3] / UM:.0f}) µm of the wafer frame at {args.objective}', flush=True)
        scan_started = time.monotonic()
        try:
            result, flakes, poses = run_scan(region, args.chip_id, corners, args.objective, args.detector,
                                             args.revisit, None, args.timeout, progress=progress)
        finally:
            if recorder is not None:
                recorder.send_signal(2)
                try:
                    recorder.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    recorder.kill()
        dead = system.dead()
        if dead:
            print(f'flake-demo: warning: node(s) exited during the scan: {dead}', file=sys.stderr)

    truth, too_small = targets_in_region(wafer, *region)
    found = [FoundFlake(f.flake_id, f.material, f.layer_class, f.centre, f.area, f.score) for f in flakes]
    score = score_scan(found, truth, region=region, ignored=too_small)
    area_cm2 = (region[2] - region[0]) * (region[3] - region[1]) * 1e4
    # The scan proper ends where the revisits begin; the revisits are timed on their own.
    revisits_began = progress.phase_started.get('revisit')
    scan_wall = (revisits_began - scan_started) if revisits_began else result.duration
    revisit_wall = max(0.0, result.duration - scan_wall)
    timings = {
        'tiles': result.tiles_total,
        'scan wall time (the revisits apart)': f'{scan_wall:.1f} s',
        'hardware time (moves, settles, exposures)': f'{result.hardware_time:.1f} s',
        'software overhead (wall / hardware)': f'{scan_wall / result.hardware_time:.2f}'
        if result.hardware_time > 0 else '-',
        'scan rate': f'{scan_wall / area_cm2:.0f} s/cm²',
        'time spent focusing': f'{result.focus_time:.1f} s',
        'detection lag after the last frame': f'{result.detection_lag:.2f} s',
        'flakes revisited at 50x (thinnest first)': result.flakes_revisited,
        'revisits wall time (move, autofocus, capture, detection)': f'{revisit_wall:.1f} s',
        'report written': local_time(time.time()),
    }
    mosaic = data_dir / 'scans' / result.scan_id / 'mosaic.png'
    frames = {tile: ScanFrameFile(data_dir / frame_file(result.scan_id, tile), Affine2D.from_list(pose[5]),
                                  pose[3], pose[4]) for tile, pose in poses.items()}
    page = write_report(report_dir, flakes, None, mosaic, score, timings, title=f'Flake scan {result.scan_id}',
                        frames=frames, created=time.time())
    print()
    print(text_summary(flakes, score, timings))
    print(f'\nreport: {page.resolve()}')
    print(f'lab web app over this scan: make web   (flake-web --db {(data_dir / "registry.sqlite").resolve()} '
          f'--data-dir {data_dir.resolve()}), then open http://127.0.0.1:8080/')
    bag = report_dir / 'scan_bag'
    if bag.exists():
        write_ground_truth(wafer, camera_params, poses, bag / 'ground_truth.json')
        print(f'bag of the scan (ground truth beside it): {bag.resolve()}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
