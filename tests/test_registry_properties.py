"""Property-based tests (hypothesis) of every service registry_node offers.

Requests are drawn field by field from the service definitions themselves, so a
service added later is covered too: ordinary, empty, blank, huge, non-ASCII and
path-like strings, every float including NaN, infinities and 1e-9, lists of any
length, images whose size, step and encoding disagree. For each request the node's
own service callback must answer (no exception, so no crash and no hang), the answer
must be serialisable for DDS, and a refusal must carry a message and one of the error
codes the service declares in its .srv file (never INTERNAL_ERROR). A smaller run goes
through DDS with flake_registry.client.
"""

from __future__ import annotations

import math
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# Imported with the module, not inside a test: importing it mid-run (pytest rewrites
# hypothesis's modules) met CPython 3.11's "AST constructor recursion depth mismatch"
# about one run in eight, when the garbage collector ran finalisers during the parse.
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, rule
import numpy as np
import pytest
from rclpy.serialization import serialize_message
from registry_helpers import running_registry

from flake_core.ros_image import numpy_to_image
from flake_msgs.srv import MarkFlakeUsed, ReleaseFlake, ReserveFlake
from flake_registry.client import RegistryClient, RegistryServiceError
from flake_registry.store import FlakeStore, Sighting

pytestmark = pytest.mark.ros

UM = 1e-6
EXISTING_IMAGE = 'crops/c1.png'                 # inside the data folder
TEXTS = ['', ' ', '\t\n', 'F0000001', 'F0000002', 'F9999999', 'graphene', 'hbn', 'mono', 'few', 'score', 'distance',
         'crop', 'revisit', 'arm-1', 'chip-P', 'scan-P', 'S0123456789ab', EXISTING_IMAGE, '/etc/passwd',
         '../../etc/passwd', 'crops/../../registry.sqlite', 'registry.sqlite', 'bgr8', 'mono8', '32FC1',
         'ψ-arm ✓', 'r' * 65, 'n' * 1001, 'x' * 200_000]
FLOATS = [0.0, -0.0, 1e-9, 0.5, 1.0, 2.0, 60.0, 1e5, 1e308, -1.0, math.nan, math.inf, -math.inf, 1e-6, 3e-4]


def text():
    return st.one_of(st.sampled_from(TEXTS), st.text(max_size=24))


def field(kind: str, name: str):
    """A strategy for one field of a ROS message from its type string."""
    if kind.startswith('sequence<') or kind.endswith(']'):
        inner = kind[len('sequence<'):-1] if kind.startswith('sequence<') else kind[:kind.index('[')]
        inner = inner.split(',')[0]
        if kind.endswith(']'):
            size = int(kind[kind.index('[') + 1:-1])
            return st.lists(field(inner, name), min_size=size, max_size=size)
        if inner in ('uint8', 'octet') and name == 'data':
            return st.binary(max_size=64)
        return st.lists(field(inner, name), max_size=20)
    if kind == 'string' or kind.startswith('string<'):
        return text()
    if kind in ('double', 'float'):
        values = st.one_of(st.sampled_from(FLOATS), st.floats(allow_nan=True, allow_infinity=True,
                                                              width=64 if kind == 'double' else 32))
        return values
    if kind == 'boolean':
        return st.booleans()
    if kind.startswith(('uint', 'int')) or kind in ('octet', 'byte', 'char'):
        bits = int(''.join(c for c in kind if c.isdigit()) or 8)
        low, high = (0, 2 ** bits - 1) if kind.startswith('uint') or kind in ('octet', 'byte', 'char') else \
            (-2 ** (bits - 1), 2 ** (bits - 1) - 1)
        return st.one_of(st.sampled_from([v for v in (0, 1, 2, 5, 100, 1000, 1001, high) if low <= v <= high]),
                         st.integers(low, high))
    return st.builds(_message_class(kind), **{n: field(k, n) for n, k in
                                              _message_class(kind).get_fields_and_field_types().items()})


def _message_class(kind: str):
    package, _, name = kind.partition('/')
    module = __import__(f'{package}.msg', fromlist=[name])
    return getattr(module, name)


# What a well-meaning caller sends, per field name: drawn for whole requests so that the
# paths past validation (reserve, release, images, recipes) are taken too.
PLAUSIBLE = {
    'material': ['', 'graphene', 'hbn'], 'materials': ['graphene', 'hbn'], 'sort_by': ['', 'score', 'area', 'distance'],
    'flake_id': [f'F{i:07d}' for i in range(1, 11)], 'robot_id': ['arm-1', 'arm-2'], 'token': ['', 'not-a-token'],
    'note': ['', 'stack 1'], 'chip_id': ['', 'chip-P'], 'scan_id': ['', 'scan-P'], 'role': ['crop', 'revisit'],
    'path': [EXISTING_IMAGE, ''], 'objective': ['', '50x'], 'layer_classes': [0, 1, 2, 3, 4],
    'statuses': [1, 2, 3], 'lease': [0.0, 1.0, 30.0], 'limit': [0, 1, 5, 1000], 'offset': [0, 3],
    'layers_min': [0.0, 1.0], 'layers_max': [0.0, 5.0], 'min_score': [0.0, 0.5], 'pixel_size': [0.0, 1e-7],
    'max_distance': [1e-4, 1e-3], 'measured_by': ['', 'scan_coordinator'], 'recipe_id': ['S0123456789ab'],
    'chip_ids': ['chip-P'], 'x': [0.0, 1e-4, 2e-3], 'y': [0.0, 1e-4, 2e-3],
}


def plausible_field(kind: str, name: str):
    if kind.startswith('sequence<'):
        inner = kind[len('sequence<'):-1].split(',')[0]
        if name == 'data':
            return st.just(b'')
        return st.lists(plausible_field(inner, name), max_size=3)
    if name in PLAUSIBLE:
        return st.sampled_from(PLAUSIBLE[name])
    if kind == 'string' or kind.startswith('string<'):
        return st.just('')
    if kind == 'boolean':
        return st.booleans()
    if '/' in kind:
        return plausible_message(_message_class(kind))
    return field(kind, name) if kind.endswith(']') else st.just(0.0 if kind in ('double', 'float') else 0)


def plausible_message(msg_class):
    if msg_class.__name__ == 'Image':
        return st.one_of(st.just(msg_class()), valid_images())
    fields = msg_class.get_fields_and_field_types()
    return st.builds(msg_class, **{name: plausible_field(kind, name) for name, kind in fields.items()})


def message(msg_class):
    """A strategy for whole messages of ``msg_class``: plausible ones, or every field drawn anyhow."""
    fields = msg_class.get_fields_and_field_types()
    strategies = {name: field(kind, name) for name, kind in fields.items()}
    if msg_class.__name__ == 'Image':
        return st.one_of(st.builds(msg_class, **strategies), valid_images(), st.just(msg_class()))
    return st.one_of(plausible_message(msg_class), st.builds(msg_class, **strategies))


@st.composite
def valid_images(draw):
    encoding = draw(st.sampled_from(['bgr8', 'rgb8', 'mono8', 'mono16']))
    height, width = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    dtype, channels = (np.uint16, 1) if encoding == 'mono16' else (np.uint8, 1 if encoding == 'mono8' else 3)
    shape = (height, width) if channels == 1 else (height, width, channels)
    pixels = np.random.default_rng(draw(st.integers(0, 99))).integers(0, 255, shape).astype(dtype)
    return numpy_to_image(pixels, encoding)


def declared_codes(srv_type) -> set[str]:
    return {getattr(srv_type.Response, name) for name in dir(srv_type.Response) if name.startswith('ERROR_')}


@pytest.fixture(scope='module')
def registry(ros, tmp_path_factory):
    data = tmp_path_factory.mktemp('properties')
    (data / 'crops').mkdir()
    (data / EXISTING_IMAGE).write_bytes(b'\x89PNG\r\n\x1a\n')
    with FlakeStore(data / 'registry.sqlite') as store:
        store.ingest([Sighting('chip-P', 'scan-P', x=i * 100 * UM, y=0.0, material=('graphene', 'hbn')[i % 2],
                               layer_class=1 + i % 3, layers=1.0 + i, score=0.5 + 0.1 * (i % 5), area=1e-10)
                      for i in range(10)])
    with running_registry(data / 'registry.sqlite') as node:
        yield node


def registry_services(node):
    """(name, service type, callback) of every flake_msgs service the node offers."""
    found = [(s.service_name.rsplit('/', 1)[-1], s.srv_type, s.callback) for s in node.services
             if s.srv_type.__module__.startswith('flake_msgs')]
    assert len(found) >= 8
    return found


SERVICE_NAMES = ['query_flakes', 'get_flake', 'reserve_flake', 'release_flake', 'mark_flake_used',
                 'get_revisit_list', 'add_flake_image', 'get_stack_recipe']


def test_every_registry_service_is_covered(registry):
    assert set(SERVICE_NAMES) <= {name for name, _, _ in registry_services(registry)}


def check_answer(name, srv_type, request, response):
    assert isinstance(response, srv_type.Response), name
    serialize_message(response)  # it can go back over DDS
    if not response.success:
        assert response.error_code in declared_codes(srv_type), (name, response.error_code, response.message)
        assert response.error_code != 'INTERNAL_ERROR', response.message
        assert response.message.strip(), (name, response.error_code)
    else:
        assert response.error_code == ''


def property_of(name, srv_type, callback):
    """The hypothesis test of one service: any request, answered with a declared code."""
    @settings(max_examples=120, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(request=message(srv_type.Request))
    def answers(request):
        check_answer(name, srv_type, request, callback(request, srv_type.Response()))
    return answers


@pytest.mark.parametrize('service', SERVICE_NAMES + ['*others'])
def test_any_request_gets_an_answer_with_a_declared_code(registry, service):
    services = registry_services(registry)
    chosen = ([s for s in services if s[0] == service] if service != '*others'
              else [s for s in services if s[0] not in SERVICE_NAMES])
    assert chosen
    for name, srv_type, callback in chosen:
        property_of(name, srv_type, callback)()


@settings(max_examples=40, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_over_dds_every_request_is_answered(registry, data):
    """The same through the ROS graph: each call comes back (answered or refused), none hangs."""
    client = _client()
    name = data.draw(st.sampled_from(SERVICE_NAMES))
    srv_type = next(t for n, t, _ in registry_services(registry) if n == name)
    request = data.draw(message(srv_type.Request))
    try:
        response = client.call(name, request)
    except RegistryServiceError as error:
        assert error.code in declared_codes(srv_type) and error.code != 'INTERNAL_ERROR', error
    else:
        check_answer(name, srv_type, request, response)


_CLIENTS: list[RegistryClient] = []


def _client() -> RegistryClient:
    if not _CLIENTS:
        _CLIENTS.append(RegistryClient(robot_id='property-robot', timeout=120.0))  # the timeout: a hang guard
    return _CLIENTS[0]


def teardown_module():
    for client in _CLIENTS:
        client.close()


def test_the_registry_is_whole_afterwards(registry):
    assert registry.store.integrity_check() == 'ok'
    image_dir = Path(registry.image_dir)
    for path in image_dir.rglob('*'):
        assert image_dir.resolve() in path.resolve().parents  # nothing written outside its folder


# -- reservations as a state machine: every answer as a model of the flakes predicts -------------------


def test_reserve_release_and_mark_used_follow_the_model(registry):
    services = {name: callback for name, _, callback in registry_services(registry)}
    runs = iter(range(10_000))

    class Reservations(RuleBasedStateMachine):
        tokens = Bundle('tokens')

        @initialize()
        def fresh_flakes(self):
            # Flakes of a chip of their own each run, far from every other flake: the model starts empty.
            chip = f'chip-M{next(runs)}'
            outcomes = registry.store.ingest([Sighting(chip, 'scan-M', x=i * 1e-3, y=5e-3, material='graphene',
                                                       score=0.9) for i in range(3)])
            self.flakes = [o.flake_id for o in outcomes]
            self.state = {f: None for f in self.flakes}   # None: available; a token: reserved; 'used'

        def call(self, name, srv_type, **fields):
            response = services[name](srv_type.Request(**fields), srv_type.Response())
            check_answer(name, srv_type, None, response)
            return response

        @rule(target=tokens, index=st.integers(0, 2), robot=st.sampled_from(['arm-1', 'arm-2']))
        def reserve(self, index, robot):
            flake = self.flakes[index]
            response = self.call('reserve_flake', ReserveFlake, flake_id=flake, robot_id=robot, lease=600.0)
            expected = {None: '', 'used': 'ALREADY_USED'}.get(self.state[flake], 'ALREADY_RESERVED')
            assert response.error_code == expected, (flake, self.state, response.message)
            if response.success:
                self.state[flake] = response.token
            return response.token or 'forged'

        @rule(index=st.integers(0, 2), token=st.one_of(tokens, st.just('forged')))
        def release(self, index, token):
            flake = self.flakes[index]
            held = self.state[flake]
            response = self.call('release_flake', ReleaseFlake, flake_id=flake, token=token)
            expected = 'NOT_RESERVED' if held in (None, 'used') else ('' if token == held else 'WRONG_TOKEN')
            assert response.error_code == expected, (flake, self.state, response.message)
            if response.success:
                self.state[flake] = None

        @rule(index=st.integers(0, 2), token=st.one_of(tokens, st.just('forged')))
        def mark_used(self, index, token):
            flake = self.flakes[index]
            held = self.state[flake]
            response = self.call('mark_flake_used', MarkFlakeUsed, flake_id=flake, token=token, note='stack')
            expected = {None: 'NOT_RESERVED', 'used': 'ALREADY_USED'}.get(held, '' if token == held else 'WRONG_TOKEN')
            assert response.error_code == expected, (flake, self.state, response.message)
            if response.success:
                self.state[flake] = 'used'

    Reservations.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None, database=None,
                                              derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    Reservations.TestCase().runTest()
