"""registry_node over real rclpy: detections in, every service and error code through
flake_registry.client, the request limits, concurrent robots."""

import gc
import json
import math
import random
import threading
import time

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
import numpy as np
import pytest
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from registry_helpers import make_flake as square_flake
from registry_helpers import running_registry
from ros_helpers import spin_until

from flake_core.node_tools import PIPELINE_QOS
from flake_core.ros_image import image_to_numpy, numpy_to_image
from flake_msgs.msg import Flake, FlakeArray, RegistryEvent
from flake_registry.client import (
    AlreadyReservedError,
    AlreadyUsedError,
    InvalidArgumentError,
    InvalidImageError,
    InvalidRangeError,
    LeaseExpiredError,
    NotReservedError,
    RegistryClient,
    RegistryServiceError,
    UnknownIdError,
    WrongTokenError,
)

pytestmark = pytest.mark.ros

UM = 1e-6
# Calls wait this long before a test calls them hung: a guard, not a speed limit (loaded CI hosts).
HANG_GUARD = 120.0
MATERIALS = ('graphene', 'hbn', 'mos2')


def make_flake(i, x, y, **fields):
    """Flake ``i`` of the test chip: materials in turn, even ones monolayers, scores rising with ``i``."""
    fields = {'chip_id': 'chip-N', 'material': MATERIALS[i % 3], 'score': 0.5 + 0.04 * i,
              'layer_class': Flake.LAYER_MONO if i % 2 == 0 else Flake.LAYER_FEW,
              'layers': 1.0 if i % 2 == 0 else 4.0, **fields}
    return square_flake(x, y, **fields)


class Listener:
    """A node of the test's own with its executor: publishes detections, collects events."""

    def __init__(self, ros, name):
        self.node = ros.create_node(name)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self.events = []
        self.node.create_subscription(RegistryEvent, '/registry/events', self.events.append, PIPELINE_QOS)
        self.publisher = self.node.create_publisher(FlakeArray, '/detections', PIPELINE_QOS)
        assert spin_until(self.executor, lambda: self.publisher.get_subscription_count() > 0, timeout=30)
        assert spin_until(self.executor, lambda: self.node.count_publishers('/registry/events') > 0, timeout=30)

    def publish(self, batch, until, timeout=30):
        self.publisher.publish(batch)
        assert spin_until(self.executor, until, timeout=timeout), f'{len(self.events)} events'

    def close(self):
        self.executor.shutdown()
        self.node.destroy_node()


@pytest.fixture(scope='module')
def registry(ros, tmp_path_factory):
    folder = tmp_path_factory.mktemp('registry')
    with running_registry(folder / 'registry.sqlite', diagnostics_period=0.2) as node, \
            RegistryClient(robot_id='arm-1', timeout=HANG_GUARD) as robot:
        listener = Listener(ros, 'registry_test_listener')
        # Twelve flakes 200 um apart; the thirteenth is flake 0 again from the next tile,
        # the fourteenth has no finite position and is refused.
        flakes = [make_flake(i, (i % 4) * 200 * UM, (i // 4) * 200 * UM) for i in range(12)]
        mask = (np.arange(20 * 20).reshape(20, 20) % 7 == 0).astype(np.uint8) * 255
        flakes[0].mask = numpy_to_image(mask, 'mono8')
        again = make_flake(0, 1.5 * UM, 0.0, score=0.4)
        again.tile_index = 1
        again.scan_id = 'scan-N'
        broken = make_flake(1, math.nan, 0.0)
        listener.publish(FlakeArray(scan_id='scan-N', tile_index=0, flakes=[*flakes, again, broken]),
                         lambda: len(listener.events) >= 13)
        yield node, robot, listener, mask
        listener.close()


def test_long_lived_objects_are_kept_out_of_full_collections(registry):
    # Frozen at start and every gc_freeze_period: a full collection no longer walks them during a call.
    assert gc.get_freeze_count() > 0


def flake_ids(registry, **filters):
    _, robot, _, _ = registry
    return [f.id for f in robot.query(limit=1000, **filters)]


def test_detections_are_merged_refused_and_announced(registry):
    node, _, listener, _ = registry
    assert node.stats['batches_stored'] == 1
    assert (node.stats['detections_stored'], node.stats['detections_refused'], node.stats['new_flakes']) == (13, 1, 12)
    kinds = [e.kind for e in listener.events[:13]]
    assert kinds.count(RegistryEvent.NEW_FLAKE) == 12 and kinds.count(RegistryEvent.OBSERVED) == 1
    observed = next(e for e in listener.events if e.kind == RegistryEvent.OBSERVED)
    assert json.loads(observed.detail) == {'scan_id': 'scan-N', 'tile_index': 0}
    assert observed.chip_id == 'chip-N'


def test_query_filters_sort_and_page_through_the_service(registry):
    _, robot, _, _ = registry
    everything = robot.query()
    assert everything.total == 12 and len(everything) == 12
    assert [f.score for f in everything] == sorted((f.score for f in everything), reverse=True)
    mono_graphene = robot.query(material='graphene', layer_classes=['mono'])
    assert mono_graphene.total == 2  # flakes 0 and 6
    assert {f.material for f in mono_graphene} == {'graphene'}
    assert robot.query(layers_min=2.0).total == 6
    assert robot.query(thickness_nm_max=0.5).total == 6
    assert robot.query(region=(150 * UM, -1.0, 450 * UM, 250 * UM)).total == 4
    near = robot.query(near=(200 * UM, 200 * UM), max_distance=210 * UM, sort_by='distance')
    centres = [(round(f.centre.x / UM), round(f.centre.y / UM)) for f in near]
    assert centres[0] == (200, 200) and sorted(centres[1:]) == [(0, 200), (200, 0), (200, 400), (400, 200)]
    page = robot.query(sort_by='area', ascending=True, limit=5, offset=10)
    assert page.total == 12 and len(page) == 2
    first = robot.query(material='graphene', layer_classes=[Flake.LAYER_MONO], sort_by='score', ascending=True)[0]
    # Query answers leave outlines out (query_contours: false); GetFlake has them.
    assert len(first.contour.points) == 0 and first.chip_id == 'chip-N' and first.area > 0
    assert len(robot.get(first.id).flake.contour.points) == 4


def test_query_contours_switched_on_at_run_time_sends_outlines(registry):
    node, robot, _, _ = registry
    fields = dict(material='graphene', layer_classes=[Flake.LAYER_MONO], sort_by='score', ascending=True)
    lean = robot.query(**fields)
    node.set_parameters([Parameter('query_contours', value=True)])
    try:
        full = robot.query(**fields)
    finally:
        node.set_parameters([Parameter('query_contours', value=False)])
    assert [f.id for f in full] == [f.id for f in lean] and len(full) == 2
    for with_outline, without in zip(full, lean, strict=True):
        assert len(without.contour.points) == 0
        detail = robot.get(with_outline.id).flake
        assert [(p.x, p.y) for p in with_outline.contour.points] == [(p.x, p.y) for p in detail.contour.points]
        assert len(with_outline.contour.points) == 4
        without.contour = with_outline.contour
        assert without == with_outline  # every other field as in the lean answer
    assert len(robot.query(**fields)[0].contour.points) == 0


@pytest.mark.parametrize('fields, error', [
    ({'layers_min': 5.0, 'layers_max': 2.0}, InvalidRangeError),
    ({'region': (1.0, 0.0, 0.0, 0.0)}, InvalidRangeError),
    ({'min_score': 2.0}, InvalidRangeError),
    ({'limit': 5000}, InvalidRangeError),
    ({'near': (0.0, 0.0), 'max_distance': 0.0}, InvalidRangeError),
    ({'material': 'gold'}, InvalidArgumentError),
    ({'sort_by': 'colour'}, InvalidArgumentError),
    ({'statuses': [9]}, InvalidArgumentError),
])
def test_bad_queries_get_error_codes(registry, fields, error):
    _, robot, _, _ = registry
    with pytest.raises(error) as refused:
        robot.query(**fields)
    assert refused.value.code == error.code_name and refused.value.message


def test_get_flake_returns_outline_mask_and_observations(registry):
    _, robot, _, mask = registry
    flake_id = robot.query(near=(0.0, 0.0), max_distance=5 * UM)[0].id
    info = robot.get(flake_id)
    assert info.flake.id == flake_id and info.flake.material == 'graphene'
    assert [(o.scan_id, o.tile_index) for o in info.observations] == [('scan-N', 0), ('scan-N', 1)]
    assert info.observations[1].centre.x == pytest.approx(1.5 * UM)
    assert np.array_equal(image_to_numpy(info.flake.mask), mask)
    assert info.reserved_by == '' and info.flake.status == Flake.STATUS_AVAILABLE and info.lease_expires is None
    with pytest.raises(UnknownIdError):
        robot.get('F7777777')


def test_reserve_release_mark_used_and_every_error_code(registry):
    _, robot, listener, _ = registry
    first, second, third = flake_ids(registry, material='hbn')[:3]
    held = robot.reserve(first, lease=60.0)
    assert len(held.token) >= 32 and held.lease_expires > time.time() + 50
    assert robot.get(first).reserved_by == 'arm-1'
    assert first in flake_ids(registry, statuses=['reserved'])

    def status_in_query(flake_id):
        # The answer is built from reused messages: a change must show up all the same.
        return next(f.status for f in robot.query(material='hbn', limit=1000) if f.id == flake_id)

    assert status_in_query(first) == Flake.STATUS_RESERVED
    assert status_in_query(second) == Flake.STATUS_AVAILABLE

    def code(call, *args, **kwargs):
        with pytest.raises(RegistryServiceError) as refused:
            call(*args, **kwargs)
        assert refused.value.message
        return type(refused.value)

    assert code(robot.reserve, first, robot_id='arm-2') is AlreadyReservedError
    assert code(robot.reserve, 'F0000000', robot_id='arm-2') is UnknownIdError
    assert code(robot.reserve, second, lease=-5.0, robot_id='arm-2') is InvalidArgumentError
    assert code(robot.release, first, 'forged') is WrongTokenError
    assert code(robot.release, second, 'forged') is NotReservedError
    assert code(robot.release, 'nope', 'x') is UnknownIdError
    assert code(robot.mark_used, first, 'forged') is WrongTokenError
    assert code(robot.mark_used, second, 'forged') is NotReservedError
    assert code(robot.mark_used, 'nope', 'x') is UnknownIdError

    held.release()
    assert status_in_query(first) == Flake.STATUS_AVAILABLE
    again = robot.reserve(first, robot_id='arm-2')
    again.mark_used(note='stack 3')
    assert code(robot.reserve, first) is AlreadyUsedError
    assert code(robot.mark_used, first, again.token) is AlreadyUsedError  # its own code, not NOT_RESERVED
    assert robot.get(first).flake.status == Flake.STATUS_USED
    assert status_in_query(first) == Flake.STATUS_USED

    short = robot.reserve(third, lease=1.0)  # the shortest lease there is
    spin_until(listener.executor, lambda: time.time() > short.lease_expires + 0.05, timeout=10)
    assert code(short.mark_used) is LeaseExpiredError

    assert spin_until(listener.executor, lambda: [e.kind for e in listener.events[13:]].count('reserved') >= 3,
                      timeout=10)
    mine = [(e.kind, e.flake_id, e.robot_id) for e in listener.events[13:]]
    assert mine[:4] == [('reserved', first, 'arm-1'), ('released', first, 'arm-1'), ('reserved', first, 'arm-2'),
                        ('used', first, 'arm-2')]


@pytest.mark.parametrize('call, message', [
    (lambda robot, flake: robot.reserve(flake, robot_id='r' * 200_000), 'robot_id has 200000 characters; at most 64'),
    (lambda robot, flake: robot.reserve(flake, robot_id='   '), 'robot_id must not be empty or blank'),
    (lambda robot, flake: robot.reserve(flake, lease=1e-9), 'lease 1e-09 s is below the minimum 1 s'),
    (lambda robot, flake: robot.mark_used(flake, 't', note='n' * 1_000_000), 'note has 1000000 characters'),
    (lambda robot, flake: robot.query(chip_id='c' * 5000), 'chip_id has 5000 characters; at most 128'),
    (lambda robot, flake: robot.get('F' * 10_000), 'flake_id has 10000 characters; at most 32'),
])
def test_oversized_and_blank_fields_are_refused_by_name(registry, call, message):
    _, robot, _, _ = registry
    flake = flake_ids(registry, material='mos2')[-1]
    with pytest.raises(InvalidArgumentError) as refused:
        call(robot, flake)
    assert message in refused.value.message
    assert robot.get(flake).reserved_by == ''


def test_eight_robots_racing_for_the_same_flakes_never_share_one(registry):
    _, robot, _, _ = registry
    contested = flake_ids(registry, material='mos2') + flake_ids(registry, material='graphene',
                                                                  statuses=['available'])
    assert len(contested) >= 6
    robots = [RegistryClient(robot_id=f'robot-{i}', timeout=HANG_GUARD) for i in range(8)]
    results = [[] for _ in robots]
    start = threading.Barrier(len(robots))

    def race(index):
        order = list(contested)
        random.Random(index).shuffle(order)
        robots[index].get(order[0])  # connected before the race starts
        start.wait(timeout=60)
        for flake_id in order:
            try:
                results[index].append((flake_id, robots[index].reserve(flake_id, lease=60.0)))
            except RegistryServiceError as error:
                results[index].append((flake_id, error))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(robots))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        for r in robots:
            r.close()
    assert all(len(r) == len(contested) for r in results)
    owners = {}
    for index, attempts in enumerate(results):
        for flake_id, outcome in attempts:
            if isinstance(outcome, RegistryServiceError):
                assert isinstance(outcome, AlreadyReservedError), outcome
            else:
                assert flake_id not in owners, f'{flake_id} has two owners'
                owners[flake_id] = f'robot-{index}'
    assert set(owners) == set(contested)
    for flake_id, owner in owners.items():
        assert robot.get(flake_id).reserved_by == owner


def test_revisit_list_and_stored_revisit_image(registry):
    node, robot, listener, _ = registry
    # A chip of its own, so that the other tests' reservations do not matter here.
    chip = [make_flake(i, i * 100 * UM, 0.0, chip_id='chip-R', score=0.7 + 0.05 * i) for i in range(5)]
    listener.publish(FlakeArray(scan_id='scan-R', flakes=chip),
                     lambda: sum(e.chip_id == 'chip-R' for e in listener.events) == 5)
    listed = robot.revisit_list(chip_id='chip-R', min_score=0.8)
    # Monolayers first (the registry's default revisit policy), the better score first among equals.
    assert [(round(f.score, 2), f.layer_class) for f in listed] == [
        (0.9, Flake.LAYER_MONO), (0.8, Flake.LAYER_MONO), (0.85, Flake.LAYER_FEW)]
    assert all(f.status == Flake.STATUS_AVAILABLE for f in listed)
    assert len(robot.revisit_list(chip_id='chip-R', min_score=0.8, limit=2)) == 2
    target = listed[0].id
    pixels = np.random.default_rng(3).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    stored = robot.add_image(target, 'revisit', pixels=numpy_to_image(pixels, 'bgr8'), objective='100x',
                             pixel_size=69e-9)
    # Kept under the image folder, named relative to the data folder (where the web app reads it).
    assert stored.startswith(f'images/{target}/revisit_') and stored.endswith('.png')
    import cv2
    assert np.array_equal(cv2.imread(str(node.data_dir / stored)), pixels)
    assert [f.id for f in robot.revisit_list(chip_id='chip-R', min_score=0.8)] == [f.id for f in listed[1:]]
    images = robot.get(target).images
    assert [(i.role, i.path, i.objective) for i in images] == [('revisit', stored, '100x')]

    (node.data_dir / 'crops').mkdir(exist_ok=True)
    (node.data_dir / 'crops' / 'c1.png').write_bytes(b'\x89PNG\r\n\x1a\n')
    assert robot.add_image(target, 'crop', path='crops/c1.png') == 'crops/c1.png'
    assert robot.add_image(target, 'crop', path=str(node.data_dir / 'crops' / 'c1.png')) == 'crops/c1.png'
    for outside in ('/etc/passwd', '../../etc/passwd', 'crops/../../x.png', 'registry.sqlite'):
        with pytest.raises(InvalidArgumentError, match='image path refused'):
            robot.add_image(target, 'crop', path=outside)
    with pytest.raises(InvalidArgumentError, match="no image 'crops/missing.png'"):
        robot.add_image(target, 'crop', path='crops/missing.png')
    with pytest.raises(UnknownIdError):
        robot.add_image('F0', 'crop', path='crops/c1.png')
    with pytest.raises(InvalidArgumentError):
        robot.add_image(target, 'selfie', path='crops/c1.png')
    bad = numpy_to_image(pixels, 'bgr8')
    bad.data = bad.data[:100]
    with pytest.raises(InvalidImageError):
        robot.add_image(target, 'revisit', pixels=bad)
    huge = numpy_to_image(pixels, 'bgr8')
    huge.width = 100_000
    with pytest.raises(InvalidImageError, match='each side must be'):
        robot.add_image(target, 'revisit', pixels=huge)
    with pytest.raises(InvalidRangeError):
        robot.revisit_list(limit=5000)
    assert len(robot.get(target).images) == 3


def test_diagnostics_report_the_ingest_counters(registry):
    node, _, listener, _ = registry
    seen = []
    subscription = listener.node.create_subscription(DiagnosticArray, '/diagnostics', seen.append, 10)
    try:
        assert spin_until(listener.executor, lambda: any(s.name == 'registry_node: database'
                                                         for a in seen for s in a.status), timeout=30)
    finally:
        listener.node.destroy_subscription(subscription)
    status = next(s for a in seen for s in a.status if s.name == 'registry_node: database')
    values = {kv.key: kv.value for kv in status.values}
    assert values['detections_refused'] == '1' and values['batches_dropped'] == '0'
    assert int(values['new_flakes']) == node.stats['new_flakes'] >= 12
    assert status.hardware_id == node.store.url
    assert status.level in (DiagnosticStatus.WARN, DiagnosticStatus.WARN[0])  # a refused detection warns


def test_unreadable_or_oversized_flakes_are_refused_and_ingest_goes_on(registry):
    node, robot, listener, _ = registry
    refused_before = node.stats['detections_refused']
    broken = make_flake(0, 0.0, 0.0, chip_id='chip-U')
    broken.mask = numpy_to_image(np.zeros((20, 20), np.uint8), 'mono8')
    broken.mask.data = broken.mask.data[:50]  # says 20 x 20, carries 50 bytes
    verbose = make_flake(2, 900 * UM, 0.0, chip_id='chip-U', model_version='v' * 100_000)
    good = make_flake(1, 500 * UM, 0.0, chip_id='chip-U')
    listener.publish(FlakeArray(scan_id='scan-U', flakes=[broken, verbose, good]),
                     lambda: any(e.chip_id == 'chip-U' for e in listener.events))
    assert node.wait_idle()
    assert node.stats['detections_refused'] == refused_before + 2
    assert [e.kind for e in listener.events if e.chip_id == 'chip-U'] == [RegistryEvent.NEW_FLAKE]
    assert robot.query(chip_id='chip-U').total == 1


def test_message_cache_reuses_only_unchanged_flakes():
    from dataclasses import replace

    from flake_registry.nodes.conversions import FlakeMessageCache
    from flake_registry.store import FlakeRecord

    record = FlakeRecord(id='F0000001', chip_id='c', scan_id='s', tile_index=0, material='hbn', layer_class=1,
                         layers=1.0, layers_std=0.0, thickness_nm=0.3, thickness_nm_std=0.0, score=0.9,
                         detector='contrast', model_version='', x=1e-3, y=2e-3, contour=[(0.0, 0.0)] * 3,
                         area=1e-10, bbox_px=(1, 2, 3, 4), homogeneity=0.5, isolation_distance=0.0,
                         edge_straightness=0.0, status=1, n_observations=1, created=1.0, updated=1.0,
                         detected_at=1.0)
    cache = FlakeMessageCache(2)
    first = cache.message(record)
    assert cache.message(record) is first and len(first.contour.points) == 0
    assert cache.message(record, contour=True) is not first
    reserved = cache.message(replace(record, status=2, reserved_by='arm', lease_expires=5.0))
    assert reserved.status == 2 and first.status == 1
    assert cache.message(replace(record, updated=2.0, score=0.95)).score == pytest.approx(0.95)
    assert (cache.hits, cache.misses) == (1, 4)
    assert cache.message(record) is not first  # evicted: the cache holds 2
    assert FlakeMessageCache(0).message(record) is not FlakeMessageCache(0).message(record)

