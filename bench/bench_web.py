"""Lab web app: server time of every page, picture and download with 100 000 flakes in the registry.

Fills a registry file through FlakeStore.ingest (a seeded grid of flakes over four
materials), then loads pages through the ASGI app in-process and reads the app's own
Server-Timing header (request in, answer out), so the figures are server time, not
client or network time. Prints a Markdown table; target: p99 < 300 ms per page.

With ``--before REV`` the app as it was at git revision REV is loaded beside today's
and every page is asked of both, alternately, in one run: the last column is the ratio
of today's median to the earlier one (pages that are new have none).

    python bench/bench_web.py [--flakes 100000] [--repeats 30] [--keep FILE] [--before REV]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

from fastapi.testclient import TestClient

from flake_registry.store import FlakeStore, Sighting
from flake_registry.web.app import create_app

MATERIALS = ('graphene', 'hbn', 'mos2', 'wte2')
TARGET_MS = 300.0
HOST = 'testserver'
REPO = Path(__file__).resolve().parent.parent


def detections(count: int, seed: int = 1) -> list[Sighting]:
    rng = random.Random(seed)
    per_row = int(math.ceil(math.sqrt(count)))
    out = []
    for i in range(count):
        x, y = (i % per_row) * 40e-6, (i // per_row) * 40e-6
        radius = rng.uniform(3e-6, 15e-6)
        contour = [(x + radius * math.cos(k * math.pi / 3), y + radius * math.sin(k * math.pi / 3)) for k in range(6)]
        layer_class = rng.choice((1, 2, 2, 3, 3, 3, 4))
        layers = {1: 1.0, 2: rng.uniform(2, 10), 3: rng.uniform(10, 40), 4: rng.uniform(40, 200)}[layer_class]
        out.append(Sighting(chip_id='chip-bench', scan_id='scan-bench', x=x, y=y, material=MATERIALS[i % 4],
                            tile_index=i // 50, layer_class=layer_class, layers=layers, layers_std=0.1 * layers,
                            thickness_nm=0.34 * layers, thickness_nm_std=0.03 * layers, score=rng.random(),
                            detector='contrast', model_version='bench', contour=contour,
                            area=2.6 * radius * radius, homogeneity=rng.random(), stamp=1.7e9 + i))
    return out


def fill(store: FlakeStore, count: int) -> float:
    all_detections = detections(count)
    start = time.perf_counter()
    for first in range(0, count, 5000):
        store.ingest(all_detections[first:first + 5000])
        print(f'  ingested {min(first + 5000, count)} / {count}', file=sys.stderr, flush=True)
    return time.perf_counter() - start


def server_ms(response) -> float:
    timing = response.headers['server-timing']
    return float(timing.split('dur=')[1].split(',')[0])


def app_before(revision: str, folder: Path, db_path: Path, data_dir: Path, store: FlakeStore):
    """The web app as it was at ``revision`` (its own templates and scripts), over the same registry."""
    archive = folder / 'before.tar'
    with open(archive, 'wb') as out:
        subprocess.run(['git', 'archive', revision, 'src/flake_registry/flake_registry/web'], cwd=REPO, check=True,
                       stdout=out)
    with tarfile.open(archive) as tar:
        tar.extractall(folder / 'before', filter='data')
    source = folder / 'before' / 'src' / 'flake_registry' / 'flake_registry' / 'web' / 'app.py'
    spec = importlib.util.spec_from_file_location('flake_web_before', source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.create_app(db_path, data_dir, store=store)


def percentile(times: list[float], share: float) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, math.ceil(share * len(ordered)) - 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--flakes', type=int, default=100_000)
    parser.add_argument('--repeats', type=int, default=30)
    parser.add_argument('--keep', type=Path, default=None,
                        help='registry file to keep and reuse between runs (filled when it has too few flakes)')
    parser.add_argument('--before', default='', metavar='REV',
                        help='also time the app of this git revision, alternating requests, and print the ratio')
    args = parser.parse_args()
    middle = f'F{args.flakes // 2:07d}'
    cases = [
        ('chip map page (thin flakes of the scan)', '/', {'scan_id': 'scan-bench'}, True),
        ('chip map markers (best 2 000; before: 5 000)', '/api/chipmap', {'scan_id': 'scan-bench'}, True),
        ('chip map, zoomed region with outlines', '/api/chipmap', {
            'scan_id': 'scan-bench', 'region': '0,0,1e-3,1e-3', 'outlines': 'true'}, False),
        ('browser, page 1, by score (thin flakes first)', '/flakes', {}, True),
        ('browser, page 100 (offset 4 950)', '/flakes', {'page': '100'}, True),
        ('browser, page 1000 (offset 49 950)', '/flakes', {'page': '1000'}, True),
        ('browser, hBN few-layer, by score', '/flakes', {'material': 'hbn', 'layer_classes': 'few'}, True),
        ('browser, graphene 1-2 layers, by area', '/flakes', {'material': 'graphene', 'layers_min': '1',
                                                              'layers_max': '2', 'sort_by': 'area'}, True),
        ('browser, available, score >= 0.9', '/flakes', {'statuses': 'available', 'min_score': '0.9'}, True),
        ('browser, within 500 um of a point, by distance', '/flakes', {'near_um': '6000,6000',
                                                                        'max_distance_um': '500',
                                                                        'sort_by': 'distance'}, True),
        ('browser, the same typed in mm', '/flakes', {'near_um': '6 mm, 6 mm', 'max_distance_um': '0.5 mm',
                                                      'sort_by': 'distance'}, False),
        ('JSON API, hBN, 200 per page', '/api/flakes', {'material': 'hbn', 'limit': '200'}, True),
        ('planner search: available, by score, 30', '/api/flakes', {'statuses': 'available', 'limit': '30'}, True),
        ('planner search: hBN 10-40 nm, thinnest first, 30', '/api/flakes', {
            'statuses': 'available', 'material': 'hbn', 'thickness_nm_min': '10', 'thickness_nm_max': '40',
            'sort_by': 'thickness', 'ascending': 'true', 'limit': '30'}, False),
        ('flake page', f'/flakes/{middle}', {}, True),
        ('flake thumbnail (outline, scale bar, legend)', f'/flakes/{middle}/thumb.png', {}, True),
        ('labelling page (thin flakes first)', '/labels', {}, True),
        ('planner page', '/planner', {}, True),
        ('flake zip', f'/flakes/{middle}/download.zip', {}, False),
    ]
    with tempfile.TemporaryDirectory(prefix='bench_web_') as folder:
        folder = Path(folder)
        store = FlakeStore(args.keep or folder / 'registry.sqlite', synchronous='NORMAL')
        if store.count() != args.flakes:
            if store.count():
                raise SystemExit(f'{store.path} holds {store.count()} flakes, not {args.flakes}: remove it')
            seconds = fill(store, args.flakes)
            print(f'  registry of {store.count()} flakes filled in {seconds:.1f} s', file=sys.stderr)
        data_dir = folder / 'data'
        data_dir.mkdir()
        now = create_app(store.path, data_dir, store=store, allowed_hosts=(HOST,))
        before = app_before(args.before, folder, store.path, data_dir, store) if args.before else None
        rows = []
        with TestClient(now) as client, TestClient(before or now) as old:
            for name, path, params, existed in cases:
                compare = before is not None and existed
                client.get(path, params=params)  # warm the page cache and the templates
                if compare:
                    old.get(path, params=params)
                times, old_times = [], []
                for _ in range(args.repeats):
                    response = client.get(path, params=params)
                    if response.status_code != 200:
                        raise SystemExit(f'{path} {params}: HTTP {response.status_code}: {response.text[:200]}')
                    times.append(server_ms(response))
                    if compare:
                        old_times.append(server_ms(old.get(path, params=params)))
                ratio = statistics.median(times) / statistics.median(old_times) if old_times else None
                rows.append((name, statistics.median(times), percentile(times, 0.99), ratio))
            start = time.perf_counter()
            scan_zip = client.get('/scans/scan-bench/download.zip')
            zip_s = time.perf_counter() - start
        store.close()
    print(f'\n### Web app: server time per page, {args.flakes:,} flakes in the registry, '
          f'{args.repeats} loads each\n')
    ratio_head = f' | now / {args.before} (p50) |' if args.before else ' |'
    print(f'| page | p50 [ms] | p99 [ms] | p99 < 300 ms{ratio_head}')
    print('|---|---:|---:|---|' + ('---:|' if args.before else ''))
    for name, p50, p99, ratio in rows:
        cell = (f' {ratio:.2f} |' if ratio is not None else ' new |') if args.before else ''
        print(f'| {name} | {p50:.1f} | {p99:.1f} | {"yes" if p99 < TARGET_MS else "NO"} |{cell}')
    print(f'\nZip of the whole scan ({args.flakes:,} flakes: CSV, JSON with outlines): '
          f'{len(scan_zip.content) / 1e6:.1f} MB in {zip_s:.1f} s, streamed from a temporary file.')
    return 0


if __name__ == '__main__':
    sys.exit(main())
