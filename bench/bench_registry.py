"""Flake registry bench: ingest rate of 100 000 flakes, QueryFlakes latency through the ROS service.

Prints Markdown tables. Targets (issue 5): ingest >= 2000 flakes/s, QueryFlakes p99 < 20 ms
for indexed filters; then the CPU time of each step of a 100-flake answer.
Usage: python bench/bench_registry.py [--flakes N] [--calls N] [--database PATH]
"""

from __future__ import annotations

import argparse
import gc
import math
import os
from pathlib import Path
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from flake_core.materials import LAYER_FEW, LAYER_MONO, LAYER_THICK
from flake_registry.query import FlakeQuery
from flake_registry.store import FlakeStore, Sighting

UM, MM = 1e-6, 1e-3
CHIPS = 20  # 5000 flakes per 1 cm^2 chip: dense, yet few random flakes overlap
CHIP_SIZE = 10 * MM
MATERIALS = ('graphene', 'hbn', 'mos2', 'wte2')


def make_detections(count: int, seed: int, chip: str | None = None) -> list[Sighting]:
    """Flakes spread over 10 mm chips (all on ``chip`` when given, else over CHIPS chips) with
    8-point outlines and thin flakes rare."""
    rng = random.Random(seed)
    detections = []
    for i in range(count):
        x, y = rng.uniform(0, CHIP_SIZE), rng.uniform(0, CHIP_SIZE)
        radius = rng.uniform(2, 40) * UM
        layers = max(1.0, round(rng.lognormvariate(2.5, 1.2)))
        layer_class = LAYER_MONO if layers == 1 else LAYER_FEW if layers <= 10 else LAYER_THICK
        contour = [(x + radius * math.cos(a) * rng.uniform(0.7, 1.0), y + radius * math.sin(a) * rng.uniform(0.7, 1.0))
                   for a in (k * math.pi / 4 for k in range(8))]
        on_chip = chip if chip is not None else f'chip-{i % CHIPS}'
        detections.append(Sighting(
            chip_id=on_chip, scan_id=f'scan-{on_chip.removeprefix("chip-")}', tile_index=i // 100, x=x, y=y,
            material=MATERIALS[rng.randrange(4)], layer_class=layer_class, layers=layers, layers_std=0.3,
            thickness_nm=0.34 * layers, score=rng.random(), detector='contrast', model_version='bench',
            contour=contour, area=2.6 * radius * radius, bbox_px=(rng.randrange(2000), rng.randrange(2000), 40, 40),
            homogeneity=rng.random(), edge_straightness=rng.random(), stamp=time.time()))
    return detections


def ingest_rate(path: Path, detections: list[Sighting], batch: int, synchronous: str) -> tuple[float, float, int]:
    """(flakes/s by the wall clock, flakes/s by this process's CPU time, distinct flakes stored).

    Both rates are given because the bench machine is shared: the wall-clock rate
    includes waiting for the CPU and for fsync, the CPU rate is what the code costs.
    """
    with FlakeStore(path, ingest_synchronous=synchronous) as store:
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(detections), batch):
            store.ingest(detections[i:i + batch])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        stored = store.count()
    return len(detections) / wall, len(detections) / cpu, stored


QUERIES = {
    'material + layer class, by score': dict(material='graphene', layer_classes=[LAYER_MONO]),
    'material + layers 2-5, by score': dict(material='hbn', layers_min=2.0, layers_max=5.0),
    'chip + min score, by score': dict(chip_id='chip-1', min_score=0.9),
    'region 1 x 1 mm': dict(use_region=True, region_min_x=4 * MM, region_min_y=4 * MM, region_max_x=5 * MM,
                            region_max_y=5 * MM),
    'within 300 um, by distance': dict(use_distance=True, max_distance=300 * UM, sort_by='distance'),
    'everything, by score': dict(),
    'material + layer class, limit 10': dict(material='graphene', layer_classes=[LAYER_MONO], limit=10),
}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(math.ceil(q * len(values))) - 1)]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def service_latencies(path: Path, calls: int, seed: int, cache_size: int,
                      freeze_client_gc: bool = False) -> dict[str, tuple[float, float, float, int, int, float]]:
    """Per query kind: p50 and p99 round trip [ms], registry CPU per call [ms], matches, flakes returned,
    CPU of this client process per call [ms].

    registry_node runs in its own process, as on a real system; its CPU time per call
    does not depend on how busy the machine is, the round trip does. ``freeze_client_gc``
    hides the client's long-lived objects from the garbage collector after the warm-up, as
    docs/registry.md advises Python robot clients to do.
    """
    from geometry_msgs.msg import Point
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    from flake_core.node_tools import SERVICE_QOS
    from flake_msgs.srv import QueryFlakes

    server = subprocess.Popen([sys.executable, '-m', 'flake_registry.nodes.registry_node', '--ros-args',
                               '-p', f'database_path:={path}', '-p', 'diagnostics_period:=5.0',
                               '-p', f'message_cache_size:={cache_size}'],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rclpy.init()
    client_node = rclpy.create_node('bench_registry_client')
    client = client_node.create_client(QueryFlakes, '/registry/query_flakes', qos_profile=SERVICE_QOS)
    executor = SingleThreadedExecutor()
    executor.add_node(client_node)
    rng = random.Random(seed)

    def call(request):
        future = client.call_async(request)
        executor.spin_until_future_complete(future, timeout_sec=10.0)
        if not future.done():
            client.remove_pending_request(future)
            return None
        return future.result()

    results = {}
    try:
        assert client.wait_for_service(timeout_sec=60.0), 'registry_node did not come up'
        for _ in range(20):  # the first replies may race DDS matching; warm up until answered
            if call(QueryFlakes.Request(limit=1)) is not None:
                break
        if freeze_client_gc:
            gc.freeze()
        for name, fields in QUERIES.items():
            latencies, total, returned = [], 0, 0
            cpu_before, client_cpu_before = _cpu_seconds(server.pid), time.process_time()
            for _ in range(calls):
                request = QueryFlakes.Request(**fields)
                if fields.get('use_distance'):
                    request.near = Point(x=rng.uniform(1, 9) * MM, y=rng.uniform(1, 9) * MM)
                start = time.perf_counter()
                response = call(request)
                latencies.append((time.perf_counter() - start) * 1e3)
                assert response is not None and response.success, (name, response)
                total, returned = response.total, len(response.flakes)
            cpu_ms = (_cpu_seconds(server.pid) - cpu_before) / calls * 1e3
            client_cpu_ms = (time.process_time() - client_cpu_before) / calls * 1e3
            results[name] = (statistics.median(latencies), percentile(latencies, 0.99), cpu_ms, total, returned,
                             client_cpu_ms)
    finally:
        if freeze_client_gc:
            gc.unfreeze()
        executor.shutdown()
        client_node.destroy_node()
        rclpy.try_shutdown()
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return results


def cost_split(path: Path, calls: int) -> list[tuple[str, float]]:
    """CPU time [ms] of each step of a 100-flake 'material + layer class' answer, measured in this process.

    The same code runs in registry_node (query, messages, serialisation) and in the
    robot's rclpy client (deserialisation); CPU time, unlike the round trip, does not
    depend on what else the shared machine is running.
    """
    from rclpy.serialization import deserialize_message, serialize_message

    from flake_msgs.srv import QueryFlakes
    from flake_registry.nodes.conversions import FlakeMessageCache, flake_to_msg, query_from_request

    request = QueryFlakes.Request(**QUERIES['material + layer class, by score'])
    cache = FlakeMessageCache(20000)

    def cpu_ms(step) -> float:
        step()  # first call outside the clock: imports and the SQLite page cache
        start = time.process_time()
        for _ in range(calls):
            step()
        return (time.process_time() - start) / calls * 1e3

    with FlakeStore(path) as store:
        def query():
            return store.query(query_from_request(request, 100), contours=False)
        flakes = query().flakes
        response = QueryFlakes.Response(success=True, total=len(flakes),
                                        flakes=[cache.message(f) for f in flakes])
        wire = serialize_message(response)
        return [
            ('FlakeStore.query: SQL and 100 records (server)', cpu_ms(query)),
            ('100 Flake messages built (server, cold)', cpu_ms(lambda: [flake_to_msg(f, contour=False)
                                                                        for f in flakes])),
            ('100 Flake messages from the message cache (server, cached)',
             cpu_ms(lambda: [cache.message(f) for f in flakes])),
            (f'response serialised by rclpy (server; {len(wire) / 1e3:.0f} kB)',
             cpu_ms(lambda: serialize_message(response))),
            ('response deserialised by rclpy (client)',
             cpu_ms(lambda: deserialize_message(wire, QueryFlakes.Response))),
        ]


def core_latency(path: Path, calls: int) -> float:
    """p99 of the same 'material + layer class' query on FlakeStore directly (no ROS) [ms]."""
    with FlakeStore(path) as store:
        latencies = []
        for _ in range(calls):
            start = time.perf_counter()
            store.query(FlakeQuery(materials=('graphene',), layer_classes=(LAYER_MONO,)), contours=False)
            latencies.append((time.perf_counter() - start) * 1e3)
    return percentile(latencies, 0.99)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--flakes', type=int, default=100_000)
    parser.add_argument('--calls', type=int, default=150, help='service calls per query kind')
    parser.add_argument('--seed', type=int, default=5)
    parser.add_argument('--database', type=Path,
                        help='registry file to query; built with --flakes and --seed when missing, kept afterwards '
                             '(compare two versions of the code on the same file; the ingest table is left out '
                             'when the file already exists)')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix='bench_registry_') as folder:
        folder = Path(folder)
        path = args.database or folder / 'all.sqlite'
        ingest = None
        if not path.exists():
            ingest = ingest_tables(folder, path, args.flakes, args.seed)
        with FlakeStore(path) as store:
            stored = store.count()
        print('querying through /registry/query_flakes ...', file=sys.stderr, flush=True)
        load_before = os.getloadavg()[0]
        # Every message built anew (cold), then with the node's message cache (its default).
        cold = service_latencies(path, args.calls, args.seed, cache_size=0)
        warm = service_latencies(path, args.calls, args.seed, cache_size=20000)
        frozen = service_latencies(path, args.calls, args.seed, cache_size=20000, freeze_client_gc=True)
        load_after = os.getloadavg()[0]
        split = cost_split(path, args.calls)
        core_p99 = core_latency(path, args.calls)
        size_mb = path.stat().st_size / 1e6

    print(f'\n### Flake registry ({stored} flakes, {size_mb:.0f} MB file, WAL)\n')
    if ingest is not None:
        print(ingest)
    print(f'\n| QueryFlakes via ROS service, registry_node in its own process ({args.calls} calls) | matches | '
          'returned | p50 ms | p99 ms | registry CPU ms/call | p50 ms cached | p99 ms cached | '
          'CPU ms/call cached | p50 ms cached, client GC frozen | p99 ms cached, client GC frozen | '
          'target p99 < 20 (cached, client GC frozen) |')
    print('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|')
    for name, (p50, p99, cpu_ms, total, returned, _) in cold.items():
        wp50, wp99, wcpu, _, _, _ = warm[name]
        fp50, fp99 = frozen[name][:2]
        verdict = 'ok' if fp99 < 20 else 'MISSED'
        print(f'| {name} | {total} | {returned} | {p50:.2f} | {p99:.2f} | {cpu_ms:.2f} | {wp50:.2f} | {wp99:.2f} | '
              f'{wcpu:.2f} | {fp50:.2f} | {fp99:.2f} | {verdict} |')
    print(f'\nLoad average (1 min) {load_before:.1f} before and {load_after:.1f} after the service calls, '
          f'on {os.cpu_count()} CPUs.')
    print(f'\nSame material + layer class query on FlakeStore without ROS: p99 {core_p99:.2f} ms.')
    print(f'\n| where a 100-flake answer goes (material + layer class, {args.calls} runs) | CPU ms |')
    print('|---|---:|')
    for step, cpu_ms in split:
        print(f'| {step} | {cpu_ms:.2f} |')
    name = 'material + layer class, by score'
    print(f'| registry_node process per call, cached (measured above) | {warm[name][2]:.2f} |')
    print(f'| client process per call: rclpy executor and deserialisation (cached run) | {warm[name][5]:.2f} |')
    return 0


def ingest_tables(folder: Path, path: Path, flakes: int, seed: int) -> str:
    """Build the registry at ``path`` and measure ingest rates; the Markdown table of the rates."""
    detections = make_detections(flakes, seed)
    subset = detections[:min(10_000, flakes)]
    print(f'ingesting {flakes} flakes ...', file=sys.stderr, flush=True)
    rate, rate_cpu, _ = ingest_rate(path, detections, 100, 'NORMAL')
    # FULL fsyncs every commit: its cost depends on how many flakes share one commit.
    compare = {(batch, mode): ingest_rate(folder / f'{mode}_{batch}.sqlite', subset, batch, mode)[:2]
               for batch in (100, 10) for mode in ('FULL', 'NORMAL')}
    lines = ['| ingest | detections | batch | ingest synchronous | flakes/s (wall) | flakes/s (CPU) | target |',
             '|---|---:|---:|---|---:|---:|---|']
    verdict = 'ok' if rate >= 2000 else 'MISSED'
    lines.append(f'| FlakeStore.ingest | {flakes} | 100 | NORMAL | {rate:.0f} | {rate_cpu:.0f} | >= 2000 {verdict} |')
    for (batch, mode), (wall, cpu) in compare.items():
        note = f'FULL/NORMAL wall {compare[(batch, "FULL")][0] / wall:.2f}' if mode == 'NORMAL' else ''
        lines.append(f'| FlakeStore.ingest | {len(subset)} | {batch} | {mode} | {wall:.0f} | {cpu:.0f} | {note} |')
    return '\n'.join(lines)

if __name__ == '__main__':
    sys.exit(main())
