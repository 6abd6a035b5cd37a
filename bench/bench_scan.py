"""Scan rate at 10x and the software overhead of the whole graph.

Runs the node graph (flake-system) on the simulated microscope, scans a region with
each focus strategy, and prints s/cm^2 and the overhead ratio: scan wall time over
the hardware's own time (moves with the stage's speed and acceleration, settles,
exposures and readouts, including focus frames). Greplova et al. (2020) scanned 190 s/cm^2 at 10x;
Masubuchi et al. (2020) ran about 1 frame/s. With --facility: two microscopes scanning at once
into one registry, with the demo's figures for each.
"""

import os
from pathlib import Path
import sys
import tempfile

import yaml

from flake_scanner.demo.run import camera_parameters, run_scan, sim_wafer
from flake_scanner.graph import config_dir
from flake_scanner.system import running_system

REGION_MM = (1.0, 1.0, 3.0, 3.0)


# (row label, focus strategy, autofocus_node overrides): the coarse focus sweep waiting for every
# frame against stepping on during readout, measured in the same run.
RUNS = (
    ('fixed', 'fixed', {}),
    ('focus_map, focus frames waited for', 'focus_map', {'step_during_readout': False}),
    ('focus_map, coarse sweep steps during readout', 'focus_map', {}),
)


def facility(region_mm: tuple[float, float, float, float]) -> int:
    """Two simulated microscopes scanning at once into one registry: the demo's figures for each."""
    import threading

    from flake_scanner.demo.metrics import FoundFlake, score_scan, targets_in_region
    from flake_scanner.graph import Microscope

    region = tuple(v * 1e-3 for v in region_mm)
    outcomes = {}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        os.environ['FLAKE_DATA_DIR'] = str(folder / 'data')
        shared = folder / 'facility.yaml'
        demo = yaml.safe_load((config_dir() / 'demo.yaml').read_text())
        demo['/registry_node'] = {'ros__parameters': {'database_path': str(folder / 'registry.sqlite')}}
        shared.write_text(yaml.safe_dump(demo))
        microscopes = []
        for name, seed in (('scope1', 7), ('scope2', 11)):
            own = folder / f'{name}.yaml'
            own.write_text(yaml.safe_dump({'/**/camera_node': {'ros__parameters': {'sim_seed': seed}}}))
            microscopes.append(Microscope.parse(f'{name}:sim:{own}'))

        def scan(microscope):
            try:
                run(microscope)
            except Exception as error:  # noqa: BLE001 - reported below
                outcomes[microscope.name] = error

        def run(microscope):
            camera = camera_parameters([config_dir() / 'camera_node.yaml', shared, Path(microscope.params_file)])
            wafer = sim_wafer(camera)
            corners = wafer.corner_positions_stage(noise_m=2e-6, seed=1)
            result, flakes, _ = run_scan(region, f'chip-{microscope.name}', corners, '10x', '', 0,
                                         folder / f'frames-{microscope.name}', 3600, namespace=microscope.name,
                                         registry_namespace='')
            outcomes[microscope.name] = (result, flakes, wafer)

        logs = Path(os.environ.get('FLAKE_BENCH_LOGS', folder / 'logs'))
        with running_system(microscopes=microscopes, params_file=str(shared), log_dir=logs, echo=False,
                            only={'stage_node', 'camera_node', 'autofocus_node', 'scan_coordinator', 'tiler_node',
                                  'detector_node', 'registry_node'}):
            threads = [threading.Thread(target=scan, args=(m,)) for m in microscopes]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        load = os.getloadavg()[0]
    print(f'Two simulated microscopes scanning {region_mm[2] - region_mm[0]:.0f} x {region_mm[3] - region_mm[1]:.0f} '
          f'mm at 10x at the same time into one registry (config/demo.yaml, focus map; load average {load:.1f})\n')
    print('| microscope | chip (sim seed) | tiles | wall [s] | hardware [s] | flakes in the registry | true flakes '
          '| matched | precision | recall | thin (1-10 layers) matched/true | layer class right |')
    print('|---|---|---|---|---|---|---|---|---|---|---|---|')
    for microscope, seed in zip(microscopes, (7, 11), strict=True):
        if isinstance(outcomes.get(microscope.name), Exception):
            print(f'| /{microscope.name} | chip-{microscope.name} ({seed}) | failed: {outcomes[microscope.name]} |')
            continue
        result, flakes, wafer = outcomes[microscope.name]
        truth, too_small = targets_in_region(wafer, *region)
        score = score_scan([FoundFlake(f.flake_id, f.material, f.layer_class, f.centre, f.area) for f in flakes],
                           truth, region=region, ignored=too_small).total()
        precision, recall = score.precision, score.recall
        print(f'| /{microscope.name} | chip-{microscope.name} ({seed}) | {result.tiles_done} | {result.duration:.1f} '
              f'| {result.hardware_time:.1f} | {len(flakes)} | {score.true} | {score.matched_true} | {precision:.2f} '
              f'| {recall:.2f} | {score.thin_matched}/{score.thin_true} '
              f'| {score.layer_class_correct}/{score.matched_found} |')
    return 0


def main() -> int:
    if '--facility' in sys.argv[1:]:
        return facility((1.0, 1.0, 3.0, 3.0))
    region = tuple(v * 1e-3 for v in REGION_MM)
    area_cm2 = (region[2] - region[0]) * (region[3] - region[1]) * 1e4
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        os.environ['FLAKE_DATA_DIR'] = str(folder / 'data')
        for k, (label, strategy, autofocus) in enumerate(RUNS):
            params = folder / f'params-{k}.yaml'
            params.write_text(yaml.safe_dump({
                '/**/camera_node': {'ros__parameters': {'rate': 0.0, 'sim_seed': 11}},
                '/**/detector_node': {'ros__parameters': {'backend': 'contrast'}},
                '/**/autofocus_node': {'ros__parameters': autofocus},
            }))
            camera = camera_parameters([config_dir() / 'camera_node.yaml', params])
            wafer = sim_wafer(camera)
            corners = wafer.corner_positions_stage(noise_m=2e-6, seed=1)
            with running_system(hardware='sim', params_file=str(params), log_dir=folder / f'logs-{k}', echo=False):
                result, _flakes, _poses = run_scan(region, f'bench-{k}', corners, '10x', '', 0,
                                                   folder / f'frames-{k}', timeout=1800, focus_strategy=strategy)
            rows.append((label, result, os.getloadavg()[0]))
    print(f'Scan of {REGION_MM[2] - REGION_MM[0]:.0f} x {REGION_MM[3] - REGION_MM[1]:.0f} mm at 10x '
          f'(simulated stage {5} mm/s, 0.1 m/s^2, 20 ms settle; camera 10 ms exposure + 33 ms readout)\n')
    print('| focus | tiles | wall [s] | hardware [s] | overhead (wall/hardware) | acquisition overhead '
          '((wall - detection lag)/hardware) | s/cm^2 | hardware s/cm^2 | time focusing [s] | detection lag [s] '
          '| load average |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    for label, result, load in rows:
        acquisition = (result.duration - result.detection_lag) / result.hardware_time
        print(f'| {label} | {result.tiles_total} | {result.duration:.1f} | {result.hardware_time:.1f} | '
              f'{result.duration / result.hardware_time:.2f} | {acquisition:.2f} | {result.duration / area_cm2:.0f} | '
              f'{result.hardware_time / area_cm2:.0f} | {result.focus_time:.1f} | {result.detection_lag:.2f} '
              f'| {load:.1f} |')
    print('\nThe hardware time of a focus frame is its z step, settle and exposure, plus its readout where the '
          'search waited for it. The detection lag is the time the detector needed after the last frame; '
          'on a loaded machine it, not the stage, sets the scan time.')
    return 0


if __name__ == '__main__':
    sys.exit(main())
