"""Lab web app: server time of paged flake-browser page loads with 100 000 flakes in the registry.

Fills a registry file through FlakeStore.ingest (a seeded grid of flakes over four
materials), then loads browser pages through the ASGI app in-process and reads the
app's own Server-Timing header (request in, HTML rendered out), so the figures are
server time, not client or network time. Prints a Markdown table; target: p99 <
300 ms per page.

    python bench/bench_web.py [--flakes 100000] [--repeats 30]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
import random
import statistics
import sys
import tempfile
import time

from fastapi.testclient import TestClient

from flake_registry.store import FlakeStore, Sighting
from flake_registry.web.app import create_app

MATERIALS = ('graphene', 'hbn', 'mos2', 'wte2')
TARGET_MS = 300.0


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
    return float(timing.split('dur=')[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--flakes', type=int, default=100_000)
    parser.add_argument('--repeats', type=int, default=30)
    parser.add_argument('--keep', type=Path, default=None,
                        help='registry file to keep and reuse between runs (filled when it has too few flakes)')
    args = parser.parse_args()
    cases = [
        ('browser, page 1, by score', '/flakes', {}),
        ('browser, page 100 (offset 4 950)', '/flakes', {'page': '100'}),
        ('browser, page 1000 (offset 49 950)', '/flakes', {'page': '1000'}),
        ('browser, hBN few-layer, by score', '/flakes', {'material': 'hbn', 'layer_classes': 'few'}),
        ('browser, graphene 1-2 layers, by area', '/flakes', {'material': 'graphene', 'layers_min': '1',
                                                              'layers_max': '2', 'sort_by': 'area'}),
        ('browser, available, score >= 0.9', '/flakes', {'statuses': 'available', 'min_score': '0.9'}),
        ('browser, within 500 um of a point, by distance', '/flakes', {'near_um': '6000,6000',
                                                                        'max_distance_um': '500',
                                                                        'sort_by': 'distance'}),
        ('JSON API, hBN, 200 per page', '/api/flakes', {'material': 'hbn', 'limit': '200'}),
        ('JSON API, planner search: available, by score, 30', '/api/flakes', {'statuses': 'available',
                                                                              'limit': '30'}),
        ('flake page', f'/flakes/F{args.flakes // 2:07d}', {}),
    ]
    with tempfile.TemporaryDirectory(prefix='bench_web_') as folder:
        store = FlakeStore(args.keep or Path(folder) / 'registry.sqlite', synchronous='NORMAL')
        if store.count() != args.flakes:
            if store.count():
                raise SystemExit(f'{store.path} holds {store.count()} flakes, not {args.flakes}: remove it')
            seconds = fill(store, args.flakes)
            print(f'  registry of {store.count()} flakes filled in {seconds:.1f} s', file=sys.stderr)
        rows = []
        with TestClient(create_app(store.path, folder, store=store)) as client:
            for name, path, params in cases:
                client.get(path, params=params)  # warm the page cache and the templates
                times = []
                for _ in range(args.repeats):
                    response = client.get(path, params=params)
                    if response.status_code != 200:
                        raise SystemExit(f'{path} {params}: HTTP {response.status_code}: {response.text[:200]}')
                    times.append(server_ms(response))
                times.sort()
                p99 = times[min(len(times) - 1, math.ceil(0.99 * len(times)) - 1)]
                rows.append((name, statistics.median(times), p99))
        store.close()
    print(f'\n### Web app: server time per page, {args.flakes:,} flakes in the registry, '
          f'{args.repeats} loads each\n')
    print('| page | p50 [ms] | p99 [ms] | target p99 < 300 ms |')
    print('|---|---:|---:|---|')
    for name, p50, p99 in rows:
        print(f'| {name} | {p50:.1f} | {p99:.1f} | {"yes" if p99 < TARGET_MS else "NO"} |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
