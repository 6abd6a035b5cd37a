"""Flake registry on SQLite and on PostgreSQL, side by side in one run.

Prints Markdown tables:
- ingest flakes/s with 1 and with 4 scanners writing at once (each its own process and
  chip, real merging; target >= 2000 flakes/s per scanner);
- reservations with 8 robots racing for the same flakes (each its own process): claims
  per second and one winner per flake;
- queries of 100-flake answers at 100 000 and 1 000 000 flakes: FlakeStore.query in
  its own process, and QueryFlakes through registry_node's ROS service (target p99 < 20 ms).

The large registries are filled by one SQL statement per 100 000 rows (the same rows
ingest would write, without merging), since ingesting a million flakes through the
merge path twice would take most of an hour on two cores; ingest is measured on its own.
PostgreSQL is Debian's server started by flake_registry.pg_server in a temporary folder.

``--before REV`` runs flake_registry as it was at git revision REV beside today's, in
the same run: every measurement is taken for both, one after the other (queries in
alternating rounds), on registries filled once at REV's schema, the copy for today's
code migrated (the migration's time is printed), and the tables give now/before ratios.

Usage: python bench/bench_registry_backends.py [--sizes 100000,1000000] [--calls 100] [--before REV]
"""

from __future__ import annotations

import argparse
import gc
import io
import math
import os
from pathlib import Path
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

from flake_core.materials import LAYER_FEW, LAYER_MONO, LAYER_THICK
from flake_registry.pg_server import TemporaryPostgres
from flake_registry.query import FlakeQuery, RegistryError
from flake_registry.store import FlakeStore, Sighting

REPO = Path(__file__).resolve().parents[1]
# SQLite's R*Tree keeps chip k as [k, k + this] of its third dimension (flake_registry.database, schema 9).
CHIP_SPAN = 0.5

UM, MM = 1e-6, 1e-3
CHIP_SIZE = 10 * MM
FLAKES_PER_CHIP = 5000  # as bench_registry.py: 5000 flakes on a 1 cm^2 chip, dense yet realistic

QUERIES = {
    'material + layer class, by score': dict(materials=('graphene',), layer_classes=(LAYER_MONO,)),
    'material + layers 2-5, by score': dict(materials=('hbn',), layers_min=2.0, layers_max=5.0),
    'chip + min score, by score': dict(chip_id='chip-1', min_score=0.9),
    'chip + region 1 x 1 mm': dict(chip_id='chip-1', region=(4 * MM, 4 * MM, 5 * MM, 5 * MM)),
    'chip + within 300 um, by distance': dict(chip_id='chip-1', near=(5 * MM, 5 * MM), max_distance=300 * UM,
                                              sort_by='distance'),
    'everything, by score': dict(),
}


def sightings(count: int, seed: int, chip: str) -> list[Sighting]:
    """Flakes spread over one 10 mm chip, as bench_registry.py makes them."""
    from bench_registry import make_detections

    return make_detections(count, seed, chip)


# -- worker processes ------------------------------------------------------------------


def worker_ingest(url: str, chip: str, count: int, seed: int) -> None:
    batch = sightings(count, seed, chip)
    with FlakeStore(url) as store:
        print('READY', flush=True)
        sys.stdin.readline()
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(batch), 100):
            store.ingest(batch[i:i + 100])
        print('DONE', len(batch), time.perf_counter() - wall, time.process_time() - cpu, flush=True)


def worker_reserve(url: str, robot: str, seed: int) -> None:
    with FlakeStore(url) as store:
        with store.snapshot() as tx:
            flake_ids = [row['id'] for row in tx.all("SELECT id FROM flakes WHERE chip_id = 'race' ORDER BY pk")]
        random.Random(seed).shuffle(flake_ids)
        print('READY', flush=True)
        sys.stdin.readline()
        won, wall, cpu = [], time.perf_counter(), time.process_time()
        for flake_id in flake_ids:
            try:
                won.append(store.reserve(flake_id, robot, 600.0).flake_id)
            except RegistryError:
                pass
        print('DONE', len(flake_ids), time.perf_counter() - wall, time.process_time() - cpu, *won, flush=True)


def worker_query(url: str) -> None:
    """Answer 'name calls' lines with 'RESULT cpu_ms latencies_ms...' (FlakeStore.query, no outlines)."""
    with FlakeStore(url) as store:
        backend_pid = None
        if store.dialect == 'postgresql':
            with store.snapshot(single_statement=True) as tx:
                backend_pid = tx.scalar('SELECT pg_backend_pid()')
        print('READY', flush=True)
        for line in sys.stdin:
            name, calls = line.rsplit(' ', 1)
            query = FlakeQuery(limit=100, **QUERIES[name])
            result = store.query(query, contours=False)
            latencies = []
            cpu, server_before = time.process_time(), cpu_seconds(backend_pid) if backend_pid else 0.0
            for _ in range(int(calls)):
                start = time.perf_counter()
                store.query(query, contours=False)
                latencies.append((time.perf_counter() - start) * 1e3)
            cpu = time.process_time() - cpu + ((cpu_seconds(backend_pid) - server_before) if backend_pid else 0.0)
            print('RESULT', result.total, cpu * 1e3, *latencies, flush=True)


def worker_schema(url: str, target: str) -> None:
    """Make (or migrate) the registry at ``url`` with this process's flake_registry; print the version."""
    from flake_registry.schema import SCHEMA_VERSION

    if target == 'version':
        print(SCHEMA_VERSION)
        return
    start = time.perf_counter()
    with FlakeStore(url) as store:
        print(store.schema_version, time.perf_counter() - start)


class Version:
    """flake_registry as it is now, or as it was at a git revision (first on PYTHONPATH of its processes)."""

    def __init__(self, label: str, source: Path | None = None):
        self.label = label
        self.env = dict(os.environ)
        if source is not None:
            self.env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(source), os.environ.get('PYTHONPATH')]))
        self.schema = int(self.run('schema', '', 'version')[0])

    @classmethod
    def at_revision(cls, revision: str, folder: Path) -> Version:
        archive = subprocess.run(['git', 'archive', revision, 'src/flake_registry'], cwd=REPO, check=True,
                                 capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(folder / 'before', filter='data')
        return cls('before', folder / 'before' / 'src' / 'flake_registry')

    def run(self, *command: str) -> list[str]:
        """This file's worker ``command`` in a process of this version; its output's words."""
        done = subprocess.run([sys.executable, __file__, *command], env=self.env, check=True, capture_output=True,
                              text=True)
        return done.stdout.split()

    def migrate(self, url: str) -> float:
        """Bring the registry to this version's schema; seconds it took."""
        return float(self.run('schema', url, 'migrate')[1])


class QueryWorker:
    """A process of one version that runs FlakeStore.query on one registry when asked."""

    def __init__(self, version: Version, url: str):
        self.process = subprocess.Popen([sys.executable, __file__, 'query', url], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=version.env)
        assert self.process.stdout.readline().strip() == 'READY'

    def measure(self, name: str, calls: int) -> tuple[int, float, list[float]]:
        """(matches, CPU ms of the calls, latencies in ms)."""
        self.process.stdin.write(f'{name} {calls}\n')
        self.process.stdin.flush()
        words = self.process.stdout.readline().split()
        assert words and words[0] == 'RESULT', words
        return int(words[1]), float(words[2]), [float(w) for w in words[3:]]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=120)


def run_workers(commands: list[list[str]], version: Version | None = None) -> list[list[str]]:
    """Start worker processes, release them together, return each one's DONE line (split)."""
    processes = [subprocess.Popen([sys.executable, __file__, *command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, env=version.env if version else None) for command in commands]
    for process in processes:
        assert process.stdout.readline().strip() == 'READY'
    for process in processes:
        process.stdin.write('go\n')
        process.stdin.flush()
    results = []
    for process in processes:
        line = process.stdout.readline().split()
        assert line and line[0] == 'DONE', line
        results.append(line[1:])
        process.wait(timeout=600)
    return results


# -- registries --------------------------------------------------------------------------


class Backends:
    """A fresh registry on either backend for each measurement."""

    def __init__(self, folder: Path, server: TemporaryPostgres):
        self.folder, self.server, self.count = folder, server, 0

    def new(self, backend: str) -> str:
        self.count += 1
        if backend == 'sqlite':
            return str(self.folder / f'registry_{self.count}.sqlite')
        return self.server.create_database(f'registry_{self.count}')

    def copy(self, url: str) -> str:
        """A second registry with the same contents (an online copy; PostgreSQL: a database from a template)."""
        self.count += 1
        if not url.startswith('postgresql'):
            target = str(self.folder / f'registry_{self.count}.sqlite')
            with sqlite3.connect(url) as source, sqlite3.connect(target) as copy:
                source.backup(copy)
            return target
        return self.server.create_database(f'registry_{self.count}', template=url.rsplit('/', 1)[1])


def fill(url: str, flakes: int, schema: int) -> None:
    """Add ``flakes`` flakes, 5000 per chip, with one INSERT ... SELECT per 100 000 rows, to a registry
    at ``schema`` (from 9 on the chip is part of the spatial index)."""
    chips = max(1, flakes // FLAKES_PER_CHIP)
    with FlakeStore(url, schema_target=schema) as store:
        postgres = store.dialect == 'postgresql'
        with store.transaction() as tx:
            tx.executemany('INSERT INTO chips (id, created, updated) VALUES (?, 0.0, 0.0) ON CONFLICT (id) DO NOTHING',
                           [(f'chip-{i}',) for i in range(chips)])
        done = 0
        while done < flakes:
            chunk = min(100_000, flakes - done)
            with store.transaction('NORMAL') as tx:
                first = int(tx.scalar('SELECT COALESCE(MAX(pk), 0) FROM flakes')) + 1
                if postgres:
                    tx.execute(f"SELECT setval('flake_pk_seq', {first + chunk})")
                    series = f'SELECT g AS pk, random() AS r1, random() AS r2, random() AS r3, random() AS r4, ' \
                             f'random() AS r5 FROM generate_series({first}, {first + chunk - 1}) AS g'
                    lpad = "'F' || lpad(pk::text, 7, '0')"
                    mod = 'mod(pk, {n})'
                else:
                    rnd = '((random() + 9223372036854775808.0) / 18446744073709551616.0)'
                    series = (f'WITH RECURSIVE s(pk) AS (SELECT {first} UNION ALL SELECT pk + 1 FROM s '
                              f'WHERE pk < {first + chunk - 1}) SELECT pk, {rnd} AS r1, {rnd} AS r2, {rnd} AS r3, '
                              f'{rnd} AS r4, {rnd} AS r5 FROM s')
                    lpad = "printf('F%07d', pk)"
                    mod = '(pk % {n})'
                whole = 'floor({})' if postgres else 'CAST({} AS INTEGER)'
                layers = (f'CASE WHEN r4 < 0.15 THEN 1 WHEN r4 < 0.5 THEN 2 + {whole.format("r4 * 16")} '
                          f'ELSE 11 + {whole.format("r4 * 90")} END')
                chip = "'chip-' || " + (f"({mod.format(n=chips)})::text" if postgres
                                        else f"CAST({mod.format(n=chips)} AS TEXT)")
                material = ("(ARRAY['graphene','hbn','mos2','wte2'])[1 + " + mod.format(n=4) + ']' if postgres else
                            "CASE " + mod.format(n=4) + " WHEN 0 THEN 'graphene' WHEN 1 THEN 'hbn' WHEN 2 THEN 'mos2' "
                            "ELSE 'wte2' END")
                tx.execute(
                    'INSERT INTO flakes (pk, id, chip_id, scan_id, tile_index, material, layer_class, layers, '
                    'layers_std, thickness_nm, thickness_nm_std, score, detector, model_version, x, y, contour, area, '
                    'bbox_px, homogeneity, isolation_distance, edge_straightness, status, n_observations, created, '
                    'updated, detected_at) '
                    f'SELECT pk, {lpad}, {chip}, {chip}, 0, {material}, '
                    f'CASE WHEN ({layers}) = 1 THEN {LAYER_MONO} WHEN ({layers}) <= 10 THEN {LAYER_FEW} '
                    f'ELSE {LAYER_THICK} END, {layers}, 0.3, 0.34 * ({layers}), 0.1, r3, \'contrast\', \'fill\', '
                    f'r1 * {CHIP_SIZE}, r2 * {CHIP_SIZE}, NULL, (2 + 38 * r5) * (2 + 38 * r5) * 2.6e-12, '
                    "'[0, 0, 40, 40]', r5, 0.0, 0.0, 1, 1, 0.0, 0.0, 0.0 FROM (" + series + ') AS rows')
                # Half the side of the flake's square: (2 + 38 r5) um * 0.8 (homogeneity holds r5).
                half = '(2 + 38 * f.homogeneity) * 0.8e-6'
                box = f'f.pk, f.x - {half}, f.x + {half}, f.y - {half}, f.y + {half}'
                if schema < 9:
                    tx.execute(f'INSERT INTO flake_boxes (id, min_x, max_x, min_y, max_y) SELECT {box} '
                               'FROM flakes f WHERE f.pk >= ?', (first,))
                elif postgres:
                    tx.execute(f'INSERT INTO flake_boxes (id, min_x, max_x, min_y, max_y, chip_key) SELECT {box}, '
                               'c.chip_key FROM flakes f JOIN chips c ON c.id = f.chip_id WHERE f.pk >= ?', (first,))
                else:
                    tx.execute('INSERT INTO flake_boxes (id, min_x, max_x, min_y, max_y, min_chip, max_chip) '
                               f'SELECT {box}, c.chip_key, c.chip_key + {CHIP_SPAN} FROM flakes f JOIN chips c '
                               'ON c.id = f.chip_id WHERE f.pk >= ?', (first,))
            done += chunk
        with store.transaction() as tx:
            tx.execute('UPDATE chips SET n_flakes = (SELECT COUNT(*) FROM flakes f WHERE f.chip_id = chips.id)')
            if not postgres:
                tx.execute('ANALYZE')
    if postgres:
        import psycopg

        # What autovacuum does after a bulk load: statistics and the visibility map
        # (index-only scans read no table pages).
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute('VACUUM ANALYZE')


def measure_ingest(backends: Backends, backend: str, writers: int, count: int,
                   version: Version) -> tuple[float, float, float, float]:
    """Per scanner flakes/s (wall, slowest), all scanners flakes/s (wall), and CPU ms per 1000 flakes
    of the scanners' processes and of the database server (PostgreSQL; SQLite runs inside the scanners)."""
    url = backends.new(backend)
    version.migrate(url)  # made before the writers start
    server_before = server_cpu(backends.server) if backend == 'postgresql' else 0.0
    results = run_workers([['ingest', url, f'scanner-{i}', str(count), str(i)] for i in range(writers)], version)
    server_ms = ((server_cpu(backends.server) - server_before) if backend == 'postgresql' else 0.0) * 1e3
    walls = [float(r[1]) for r in results]
    client_ms = sum(float(r[2]) for r in results) * 1e3
    flakes = writers * count
    return count / max(walls), flakes / max(walls), client_ms / flakes * 1e3, server_ms / flakes * 1e3


def measure_reservations(backends: Backends, backend: str, robots: int, flakes: int,
                         version: Version) -> tuple[float, float, bool, float]:
    """(claim attempts per second over all robots, won reservations per second, one winner per flake,
    CPU ms per attempt of robots and server together)."""
    url = backends.new(backend)
    version.migrate(url)
    with FlakeStore(url, schema_target=version.schema) as store:
        store.ingest([Sighting('race', 'race', x=i * 100 * UM, y=0.0, material='graphene', area=1e-10)
                      for i in range(flakes)])
    server_before = server_cpu(backends.server) if backend == 'postgresql' else 0.0
    results = run_workers([['reserve', url, f'robot-{i}', str(i)] for i in range(robots)], version)
    server_s = (server_cpu(backends.server) - server_before) if backend == 'postgresql' else 0.0
    wall = max(float(r[1]) for r in results)
    client_s = sum(float(r[2]) for r in results)
    won = [flake for r in results for flake in r[3:]]
    one_each = len(won) == len(set(won)) == flakes
    with FlakeStore(url, schema_target=version.schema) as store:
        with store.snapshot() as tx:
            holders = {r['id'] for r in tx.all('SELECT f.id FROM reservations r JOIN flakes f ON f.pk = r.flake_pk '
                                               'WHERE r.ended IS NULL')}
    attempts = robots * flakes
    return attempts / wall, len(won) / wall, one_each and holders == set(won), (client_s + server_s) / attempts * 1e3


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User + system CPU time of a process so far (Linux /proc); with its reaped children's."""
    try:
        fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12]) + ((int(fields[13]) + int(fields[14])) if children else 0)
    return ticks / os.sysconf('SC_CLK_TCK')


def server_cpu(server: TemporaryPostgres) -> float:
    """CPU seconds of the whole PostgreSQL server so far: postmaster, its live processes, the ended ones."""
    postmaster = int(Path(server.folder, 'data', 'postmaster.pid').read_text().split()[0])
    total = cpu_seconds(postmaster, children=True)
    for entry in Path('/proc').iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / 'stat').read_text().rsplit(')', 1)[1].split()[1]) == postmaster:
                    total += cpu_seconds(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return total


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(math.ceil(q * len(values))) - 1)]


Latencies = dict[str, dict[str, tuple[float, float, float, int]]]  # version -> query -> (p50, p99, CPU ms, matches)


def store_latencies(registries: dict[str, tuple[Version, str]], calls: int, rounds: int) -> Latencies:
    """Per version and query: p50, p99 [ms] of FlakeStore.query (no outlines, as the node asks) in a process of
    that version, CPU ms per call of that process plus, on PostgreSQL, of the server process that answered, and
    the number of matches. Versions take turns, ``rounds`` times per query."""
    workers = {label: QueryWorker(version, url) for label, (version, url) in registries.items()}
    out: Latencies = {label: {} for label in registries}
    try:
        for name in QUERIES:
            latencies: dict[str, list[float]] = {label: [] for label in registries}
            cpu = dict.fromkeys(registries, 0.0)
            matches = {}
            for worker in workers.values():
                worker.measure(name, 1)         # the statement prepared and the pages read once
            for _ in range(rounds):
                for label, worker in workers.items():
                    matches[label], cpu_ms, times = worker.measure(name, calls // rounds)
                    latencies[label] += times
                    cpu[label] += cpu_ms
            for label in registries:
                out[label][name] = (statistics.median(latencies[label]), percentile(latencies[label], 0.99),
                                    cpu[label] / len(latencies[label]), matches[label])
    finally:
        for worker in workers.values():
            worker.close()
    return out


def query_request(fields: dict):
    from flake_msgs.srv import QueryFlakes

    request = QueryFlakes.Request(limit=100)
    if 'materials' in fields:
        request.material = fields['materials'][0]
    for key in ('chip_id', 'min_score', 'layers_min', 'layers_max', 'sort_by', 'max_distance'):
        if key in fields:
            setattr(request, key, fields[key])
    request.layer_classes = list(fields.get('layer_classes', ()))
    if 'region' in fields:
        request.use_region = True
        request.region_min_x, request.region_min_y, request.region_max_x, request.region_max_y = fields['region']
    if 'near' in fields:
        request.use_distance = True
        request.near.x, request.near.y = fields['near']
    return request


def service_latencies(registries: dict[str, tuple[Version, str]], calls: int, rounds: int,
                      server_pg: TemporaryPostgres) -> Latencies:
    """Per version and query: p50, p99 [ms] of QueryFlakes round trips to a registry_node of that version in its
    own process (each under its own namespace), CPU ms per call of registry_node and of the database server
    (PostgreSQL), and the matches. Versions take turns, ``rounds`` times per query."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    from flake_core.node_tools import SERVICE_QOS
    from flake_msgs.srv import QueryFlakes

    nodes = {}
    for label, (version, url) in registries.items():
        where = f'database_url:={url}' if url.startswith('postgresql') else f'database_path:={url}'
        nodes[label] = subprocess.Popen(
            [sys.executable, '-m', 'flake_registry.nodes.registry_node', '--ros-args', '-r', f'__ns:=/{label}',
             '-p', where, '-p', 'diagnostics_period:=5.0'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=version.env)
    rclpy.init()
    node = rclpy.create_node('bench_backends_client')
    clients = {label: node.create_client(QueryFlakes, f'/{label}/registry/query_flakes', qos_profile=SERVICE_QOS)
               for label in registries}
    executor = SingleThreadedExecutor()
    executor.add_node(node)

    def call(label, request):
        future = clients[label].call_async(request)
        executor.spin_until_future_complete(future, timeout_sec=20.0)
        if not future.done():
            clients[label].remove_pending_request(future)
            return None
        return future.result()

    def cpu_now(label):
        postgres = registries[label][1].startswith('postgresql')
        return cpu_seconds(nodes[label].pid) + (server_cpu(server_pg) if postgres else 0.0)

    out: Latencies = {label: {} for label in registries}
    try:
        for label, client in clients.items():
            assert client.wait_for_service(timeout_sec=120.0), f'registry_node ({label}) did not come up'
            for _ in range(20):
                if call(label, QueryFlakes.Request(limit=1)) is not None:
                    break
        gc.freeze()  # as docs/registry.md advises Python robot clients
        for name, fields in QUERIES.items():
            request = query_request(fields)
            latencies: dict[str, list[float]] = {label: [] for label in registries}
            cpu = dict.fromkeys(registries, 0.0)
            total = {}
            for label in registries:
                call(label, request)
            for _ in range(rounds):
                for label in registries:
                    before = cpu_now(label)
                    for _ in range(calls // rounds):
                        start = time.perf_counter()
                        response = call(label, request)
                        latencies[label].append((time.perf_counter() - start) * 1e3)
                        assert response is not None and response.success, (name, response and response.message)
                    cpu[label] += cpu_now(label) - before
                    total[label] = response.total
            for label in registries:
                out[label][name] = (statistics.median(latencies[label]), percentile(latencies[label], 0.99),
                                    cpu[label] / len(latencies[label]) * 1e3, total[label])
    finally:
        gc.unfreeze()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
        for process in nodes.values():
            process.send_signal(signal.SIGINT)
        for process in nodes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    return out


def ratio(now: float, before: float) -> str:
    return f'{now / before:.2f}' if before > 0 else '-'


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--sizes', default='100000,1000000', help='registry sizes for the query tables')
    parser.add_argument('--calls', type=int, default=100, help='calls per query kind (and version)')
    parser.add_argument('--rounds', type=int, default=5, help='turns the versions take per query kind')
    parser.add_argument('--ingest', type=int, default=10_000, help='sightings per scanner in the ingest tables')
    parser.add_argument('--skip-service', action='store_true', help='leave out the ROS service round trips')
    parser.add_argument('--before', default='', metavar='REV', help='also measure flake_registry as at git REV')
    args = parser.parse_args()
    sizes = [int(v) for v in args.sizes.split(',') if v]
    backend_names = ('sqlite', 'postgresql')
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix='bench_backends_') as folder, TemporaryPostgres() as server:
        now = Version('now')
        versions = [Version.at_revision(args.before, Path(folder)), now] if args.before else [now]
        backends = Backends(Path(folder), server)
        print('ingest ...', file=sys.stderr, flush=True)
        ingest = {}
        for writers in (1, 4):
            for backend in backend_names:
                for version in versions:  # interleaved: each sees the same machine load
                    ingest[(writers, backend, version.label)] = measure_ingest(backends, backend, writers,
                                                                               args.ingest, version)
        load.append(os.getloadavg()[0])
        print('reservations ...', file=sys.stderr, flush=True)
        races = {(backend, version.label): measure_reservations(backends, backend, 8, 300, version)
                 for backend in backend_names for version in versions}
        queries, notes = {}, []
        for size in sizes:
            for backend in backend_names:
                print(f'{backend}: filling {size} flakes ...', file=sys.stderr, flush=True)
                first = versions[0]
                url = backends.new(backend)
                first.migrate(url)
                fill_start = time.perf_counter()
                fill(url, size, first.schema)
                note = f'{backend}, {size} flakes: filled by SQL in {time.perf_counter() - fill_start:.0f} s'
                registries = {first.label: (first, url)}
                if len(versions) > 1:
                    copy = backends.copy(url)
                    seconds = now.migrate(copy)
                    registries[now.label] = (now, copy)
                    if now.schema > first.schema:
                        note += (f'; a copy migrated from schema {first.schema} to {now.schema} in {seconds:.1f} s '
                                 '(wall)')
                notes.append(note)
                print(f'{backend}: {size} flakes: queries ...', file=sys.stderr, flush=True)
                core = store_latencies(registries, args.calls, args.rounds)
                service = {} if args.skip_service else service_latencies(registries, args.calls, args.rounds, server)
                queries[(backend, size)] = (core, service)
                load.append(os.getloadavg()[0])

    labels = [version.label for version in versions]
    compare = len(labels) > 1
    print('\n### Flake registry: SQLite and PostgreSQL side by side\n')
    print(f'Load average (1 min) {min(load):.1f}-{max(load):.1f} during the run, on {os.cpu_count()} CPUs '
          f'(shared machine); PostgreSQL {server.bin.parent.name} on the same machine'
          + (f'; "before" is flake_registry at {args.before}, "now" the working tree.' if compare else '.') + '\n')
    print(f'| ingest ({args.ingest} sightings per scanner, batches of 100) | backend | code | flakes/s per scanner '
          '(wall, slowest) | flakes/s all scanners (wall) | CPU ms per 1000 flakes: scanners | CPU ms per 1000 '
          'flakes: server | flakes per CPU second (scanners + server) |' + (' CPU now/before |' if compare else ''))
    print('|---|---|---|---:|---:|---:|---:|---:|' + ('---:|' if compare else ''))
    for (writers, backend, label), (per, total, client_ms, server_ms) in ingest.items():
        cell = ''
        if compare:
            base = ingest[(writers, backend, labels[0])]
            cell = f' {ratio(client_ms + server_ms, base[2] + base[3])} |' if label != labels[0] else ' |'
        print(f'| {writers} scanner{"s" if writers > 1 else ""} at once | {backend} | {label} | {per:.0f} | '
              f'{total:.0f} | {client_ms:.0f} | {server_ms:.0f} | {1e6 / (client_ms + server_ms):.0f} |{cell}')
    print('\n| 8 robots racing for the same 300 flakes (own processes, FlakeStore.reserve) | backend | code | '
          'attempts/s | reservations won/s | one winner per flake | CPU ms per attempt (robots + server) |')
    print('|---|---|---|---:|---:|---|---:|')
    for (backend, label), (attempts, won, one_each, cpu_ms) in races.items():
        print(f'| 2400 attempts | {backend} | {label} | {attempts:.0f} | {won:.0f} | {"yes" if one_each else "NO"} | '
              f'{cpu_ms:.2f} |')
    for size in sizes:
        for backend in backend_names:
            core, service = queries[(backend, size)]
            name_of = {'sqlite': 'SQLite', 'postgresql': 'PostgreSQL'}[backend]
            server_part = ' (with the server)' if backend == 'postgresql' else ''
            columns = ['matches']
            for what in ('store p50 / p99 ms', f'store CPU ms/call{server_part}', 'QueryFlakes p50 / p99 ms',
                         f'registry CPU ms/call{server_part}'):
                columns += [f'{what} {label}' for label in labels] if compare else [what]
                if compare and 'CPU' in what:
                    columns.append('now/before')
            print(f'\n| {name_of}, {size} flakes: 100-flake answers ({args.calls} calls) | ' + ' | '.join(columns)
                  + ' |')
            print('|---|' + '---:|' * len(columns))
            for name in QUERIES:
                cells = [str(core[labels[-1]][name][3])]
                for table in (core, service):
                    if not table:
                        cells += ['-'] * (len(labels) * 2 + (1 if compare else 0))
                        continue
                    cells += [f'{table[label][name][0]:.2f} / {table[label][name][1]:.2f}' for label in labels]
                    cells += [f'{table[label][name][2]:.2f}' for label in labels]
                    if compare:
                        cells.append(ratio(table[labels[-1]][name][2], table[labels[0]][name][2]))
                print(f'| {name} | ' + ' | '.join(cells) + ' |')
    print()
    for note in notes:
        print(f'- {note}.')
    return 0


if __name__ == '__main__':
    if len(sys.argv) > 1 and sys.argv[1] == 'ingest':
        worker_ingest(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    elif len(sys.argv) > 1 and sys.argv[1] == 'reserve':
        worker_reserve(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == 'query':
        worker_query(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == 'schema':
        worker_schema(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
