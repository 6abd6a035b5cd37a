"""flake_registry.client: the flake registry from a robot program or a script.

    from flake_registry.client import AlreadyReservedError, RegistryClient

    with RegistryClient(robot_id='arm-1') as registry:
        for flake in registry.query(material='graphene', layer_classes=['mono'], min_score=0.8, limit=5):
            try:
                with registry.reserve(flake.id, lease=120.0) as claim:
                    ...                                  # pick the flake up
                    claim.mark_used(note='stack 7')
                break
            except AlreadyReservedError:
                continue                                 # another robot was faster

Every call blocks until the registry answers and returns plain values; a refusal
raises a ``RegistryServiceError`` subclass named after the service's error code
(``AlreadyReservedError``, ``UnknownIdError``, ...), whose ``code`` is the code itself. Values
are SI units, as on the ROS topics (metres, square metres, seconds); ``Flake``
messages are returned as they come.

Two ways to run it:
- ``RegistryClient()`` makes its own node and executor (and initialises rclpy when
  nobody has); the calls spin that executor while they wait. Safe to call from
  several threads at once.
- ``RegistryClient(node=my_node)`` uses a node that an executor spins in another
  thread (a robot program with its own node); the calls wait on their futures.
  Never call it from one of that executor's own callbacks with a single-threaded
  executor: the answer could not be processed while the callback waits.

The service QoS is part of the client: replies are kept in a deep reliable queue
(``flake_core.node_tools.SERVICE_QOS``, the profile the registry serves with), so a
burst of calls from one process never loses one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
import math
import operator
import secrets
import threading
import time
from typing import Any

import rclpy
from rclpy.executors import SingleThreadedExecutor

from flake_core.node_tools import SERVICE_QOS
from flake_msgs.msg import Flake, FlakeImage, FlakeObservation, StackLayer
from flake_msgs.srv import (
    AddFlakeImage,
    GetFlake,
    GetRevisitList,
    GetStackRecipe,
    MarkFlakeUsed,
    QueryFlakes,
    ReleaseFlake,
    ReserveFlake,
)
from flake_registry.query import (
    ALREADY_RESERVED,
    ALREADY_USED,
    INTERNAL_ERROR,
    INVALID_ARGUMENT,
    INVALID_RANGE,
    LEASE_EXPIRED,
    NOT_RESERVED,
    UNKNOWN_ID,
    WRONG_TOKEN,
    RegistryError,
    parse_layer_class,
    parse_status,
)

SERVICES = {
    'query_flakes': QueryFlakes,
    'get_flake': GetFlake,
    'reserve_flake': ReserveFlake,
    'release_flake': ReleaseFlake,
    'mark_flake_used': MarkFlakeUsed,
    'get_revisit_list': GetRevisitList,
    'add_flake_image': AddFlakeImage,
    'get_stack_recipe': GetStackRecipe,
}
# Requests the registry refuses at once without writing anything: the first call of
# a new client, whose answer may be lost while DDS is still matching the reply path.
_PROBES = {'query_flakes': {'limit': 1}, 'get_revisit_list': {'limit': 1}}
UNAVAILABLE = 'UNAVAILABLE'
TIMEOUT = 'TIMEOUT'
INVALID_IMAGE = 'INVALID_IMAGE'


# ---------------------------------------------------------------------------
# Errors


class RegistryServiceError(RegistryError):
    """The registry refused a call (``code`` as in the service definition) or did not answer."""

    code_name = ''

    def __init__(self, code: str, message: str, flake_id: str = '', service: str = ''):
        super().__init__(code, message, flake_id)
        self.service = service


class UnknownIdError(RegistryServiceError):
    code_name = UNKNOWN_ID


class InvalidArgumentError(RegistryServiceError):
    code_name = INVALID_ARGUMENT


class InvalidRangeError(RegistryServiceError):
    code_name = INVALID_RANGE


class InvalidImageError(RegistryServiceError):
    code_name = INVALID_IMAGE


class AlreadyReservedError(RegistryServiceError):
    code_name = ALREADY_RESERVED


class AlreadyUsedError(RegistryServiceError):
    code_name = ALREADY_USED


class NotReservedError(RegistryServiceError):
    code_name = NOT_RESERVED


class WrongTokenError(RegistryServiceError):
    code_name = WRONG_TOKEN


class LeaseExpiredError(RegistryServiceError):
    code_name = LEASE_EXPIRED


class InternalError(RegistryServiceError):
    """The registry's database failed; the message says how."""

    code_name = INTERNAL_ERROR


class RegistryUnavailableError(RegistryServiceError):
    """No registry_node offers the service (wrong ROS_DOMAIN_ID or namespace, node not running)."""

    code_name = UNAVAILABLE


class RegistryTimeoutError(RegistryServiceError):
    """No answer in time. A reserve or mark-used call may still have been carried out."""

    code_name = TIMEOUT


ERRORS = {cls.code_name: cls for cls in (
    UnknownIdError, InvalidArgumentError, InvalidRangeError, InvalidImageError, AlreadyReservedError,
    AlreadyUsedError, NotReservedError, WrongTokenError, LeaseExpiredError, InternalError,
    RegistryUnavailableError, RegistryTimeoutError)}


def error_for(code: str, message: str, flake_id: str = '', service: str = '') -> RegistryServiceError:
    """The exception for a service error code (a plain RegistryServiceError for a code not known here)."""
    return ERRORS.get(code, RegistryServiceError)(code, message, flake_id, service)


# ---------------------------------------------------------------------------
# Answers


class FlakeList(list):
    """Flake messages of one query page; ``total`` counts every match before limit and offset."""

    def __init__(self, flakes: Iterable[Flake] = (), total: int = 0):
        super().__init__(flakes)
        self.total = total


@dataclass
class FlakeInfo:
    """Everything the registry knows of one flake (GetFlake)."""

    flake: Flake                                # outline and mask included
    observations: list[FlakeObservation]
    images: list[FlakeImage]
    reserved_by: str                            # robot holding a live reservation, '' if none
    lease_expires: float | None                 # [s since the epoch] of that reservation


@dataclass
class StackRecipe:
    """A stack planned in the lab web app; layers bottom first, with tokens when reserved."""

    recipe_id: str
    name: str
    robot_id: str
    layers: list[StackLayer] = field(default_factory=list)


def _seconds(stamp) -> float | None:
    value = stamp.sec + stamp.nanosec * 1e-9
    return value or None


class Claim:
    """A live reservation: the token that lets its holder release the flake or mark it used.

    As a context manager it releases the flake on exit unless it was marked used or
    released inside: a robot that fails half-way never keeps a flake locked for the
    whole lease. A lease that ran out meanwhile is not an error on exit.
    """

    def __init__(self, registry: RegistryClient, flake_id: str, robot_id: str, token: str,
                 lease_expires: float | None):
        self.registry = registry
        self.flake_id = flake_id
        self.robot_id = robot_id
        self.token = token
        self.lease_expires = lease_expires
        self.outcome = ''                       # '', 'released' or 'used'

    def __repr__(self) -> str:
        return f'Claim({self.flake_id!r}, robot_id={self.robot_id!r}, outcome={self.outcome!r})'

    def release(self) -> None:
        self.registry.release(self.flake_id, self.token)
        self.outcome = 'released'

    def mark_used(self, note: str = '') -> None:
        self.registry.mark_used(self.flake_id, self.token, note)
        self.outcome = 'used'

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self.outcome:
            return
        try:
            self.release()
        except (NotReservedError, WrongTokenError, LeaseExpiredError):
            self.outcome = 'expired'            # the lease ran out: nothing left to give back
        except RegistryServiceError:
            if exc_type is None:
                raise                           # else the body's own error is the one to see


# ---------------------------------------------------------------------------


class RegistryClient:
    """Blocking calls to registry_node's services. See the module docstring."""

    def __init__(self, robot_id: str = '', *, namespace: str = '', node=None, timeout: float = 10.0,
                 connect_timeout: float = 30.0):
        self.robot_id = robot_id
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._prefix = '/' + '/'.join(p for p in (namespace.strip('/'), 'registry') if p)
        self._owns_rclpy = False
        self._executor = None
        if node is None:
            if not rclpy.ok():
                rclpy.init()
                self._owns_rclpy = True
            node = rclpy.create_node(f'registry_client_{secrets.token_hex(4)}')
            self._executor = SingleThreadedExecutor()
            self._executor.add_node(node)
            self._owns_node = True
        else:
            self._owns_node = False
        self.node = node
        self._clients: dict[str, Any] = {}
        self._clients_lock = threading.Lock()
        self._spin_lock = threading.Lock()

    # -- plumbing -------------------------------------------------------------

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._clients_lock:
            clients, self._clients = self._clients, {}
        for client in clients.values():
            self.node.destroy_client(client)
        if self._owns_node:
            self._executor.shutdown()
            self.node.destroy_node()
            if self._owns_rclpy:
                rclpy.try_shutdown()
            self._owns_node = False

    def _wait(self, future, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        if self._executor is None:
            done = threading.Event()
            future.add_done_callback(lambda _: done.set())
            return done.wait(timeout)
        while not future.done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            # One thread spins at a time and completes every waiting thread's future.
            if self._spin_lock.acquire(timeout=min(left, 0.05)):
                try:
                    if not future.done():
                        self._executor.spin_once(timeout_sec=min(left, 0.05))
                finally:
                    self._spin_lock.release()
        return True

    def _client(self, name: str):
        with self._clients_lock:
            client = self._clients.get(name)
            if client is not None:
                return client
            client = self.node.create_client(SERVICES[name], f'{self._prefix}/{name}', qos_profile=SERVICE_QOS)
            self._clients[name] = client
        try:
            self._warm_up(name, client)
        except BaseException:
            with self._clients_lock:
                self._clients.pop(name, None)
            self.node.destroy_client(client)
            raise
        return client

    def _warm_up(self, name: str, client) -> None:
        """Wait for the service and for one answer: a reply sent before DDS has matched a new
        client's reply reader is lost, so the first request is one the registry refuses at once."""
        service = f'{self._prefix}/{name}'
        deadline = time.monotonic() + self.connect_timeout
        if not self._wait_for_service(client, deadline):
            raise RegistryUnavailableError(UNAVAILABLE, f'no registry answers on {service} after '
                                                   f'{self.connect_timeout:.0f} s: is registry_node running with '
                                                   'the same ROS_DOMAIN_ID and namespace?', service=service)
        request = SERVICES[name].Request(**_PROBES.get(name, {}))
        while time.monotonic() < deadline:
            future = client.call_async(request)
            if self._wait(future, min(2.0, max(deadline - time.monotonic(), 0.0))):
                return
            client.remove_pending_request(future)
        raise RegistryUnavailableError(UNAVAILABLE, f'{service} is offered but never answered in '
                                               f'{self.connect_timeout:.0f} s', service=service)

    def _wait_for_service(self, client, deadline: float) -> bool:
        while time.monotonic() < deadline:
            if client.service_is_ready():
                return True
            time.sleep(0.05)  # discovery runs in the middleware's own threads
        return client.service_is_ready()

    def call(self, name: str, request, *, retry: bool = False, flake_id: str = ''):
        """The response of service ``name`` (a key of SERVICES) to ``request``; raises on refusal.

        ``retry``: ask once more after a timeout (only for calls that change nothing).
        """
        client = self._client(name)
        for attempt in (1, 2):
            future = client.call_async(request)
            if self._wait(future, self.timeout):
                break
            client.remove_pending_request(future)
            if not retry or attempt == 2:
                hint = ('; the call may still have been carried out: ask get() before trying again'
                        if name in ('reserve_flake', 'release_flake', 'mark_flake_used', 'add_flake_image') else '')
                raise RegistryTimeoutError(TIMEOUT, f'no answer from {self._prefix}/{name} in {self.timeout:.1f} s'
                                      + hint, flake_id, name)
        response = future.result()
        if not response.success:
            raise error_for(response.error_code, response.message, flake_id, name)
        return response

    # -- the robot's calls ----------------------------------------------------------

    def query(self, *, material: str = '', chip_id: str = '', scan_id: str = '',
              layer_classes: Sequence[int | str] = (), layers_min: float = 0.0, layers_max: float = 0.0,
              thickness_nm_min: float = 0.0, thickness_nm_max: float = 0.0, area_min: float = 0.0,
              area_max: float = 0.0, min_score: float = 0.0, min_homogeneity: float = 0.0,
              statuses: Sequence[int | str] = (), region: Sequence[float] | None = None,
              near: Sequence[float] | None = None, max_distance: float | None = None, sort_by: str = '',
              ascending: bool = False, limit: int = 0, offset: int = 0) -> FlakeList:
        """Flakes that match every filter given, best first (``sort_by``), one page.

        Lengths [m], areas [m^2] in the wafer frame; ``layer_classes`` and ``statuses``
        by name ('mono', 'available') or number; ``region`` is (min_x, min_y, max_x,
        max_y); ``near`` (x, y) with ``max_distance`` keeps a disc and ``sort_by='distance'``
        sorts nearest first. 0 or empty means no constraint; ``limit`` 0 is the registry's default.
        """
        request = QueryFlakes.Request(
            material=material, chip_id=chip_id, scan_id=scan_id,
            layer_classes=self._numbers(layer_classes, parse_layer_class),
            layers_min=float(layers_min), layers_max=float(layers_max), thickness_nm_min=float(thickness_nm_min),
            thickness_nm_max=float(thickness_nm_max), area_min=float(area_min), area_max=float(area_max),
            min_score=float(min_score), min_homogeneity=float(min_homogeneity),
            statuses=self._numbers(statuses, parse_status), sort_by=sort_by, ascending=bool(ascending),
            limit=self._count('limit', limit), offset=self._count('offset', offset))
        if region is not None:
            values = self._floats('region', region, 4)
            request.use_region = True
            request.region_min_x, request.region_min_y, request.region_max_x, request.region_max_y = values
        if near is not None:
            request.near.x, request.near.y = self._floats('near', near, 2)
        if max_distance is not None:
            if near is None:
                raise InvalidArgumentError(INVALID_ARGUMENT, 'max_distance needs a point near=(x, y)')
            request.use_distance = True
            request.max_distance = float(max_distance)
        response = self.call('query_flakes', request, retry=True)
        return FlakeList(response.flakes, response.total)

    def get(self, flake_id: str) -> FlakeInfo:
        """Everything about one flake: outline, mask, observations, images, holder. Raises UnknownIdError."""
        response = self.call('get_flake', GetFlake.Request(flake_id=flake_id), retry=True, flake_id=flake_id)
        return FlakeInfo(flake=response.flake, observations=list(response.observations),
                         images=list(response.images), reserved_by=response.reserved_by,
                         lease_expires=_seconds(response.lease_expires))

    def reserve(self, flake_id: str, lease: float = 0.0, robot_id: str = '') -> Claim:
        """Claim a flake for ``lease`` seconds (0: the registry's default) for ``robot_id`` (default:
        the client's). Use the answer as a context manager to release the flake when done."""
        robot_id = robot_id or self.robot_id
        response = self.call('reserve_flake', ReserveFlake.Request(flake_id=flake_id, robot_id=robot_id,
                                                                   lease=float(lease)), flake_id=flake_id)
        return Claim(self, flake_id, robot_id, response.token, _seconds(response.lease_expires))

    def release(self, flake_id: str, token: str) -> None:
        self.call('release_flake', ReleaseFlake.Request(flake_id=flake_id, token=token), flake_id=flake_id)

    def mark_used(self, flake_id: str, token: str, note: str = '') -> None:
        """The flake went into a stack: it leaves the pool for good. Needs the live reservation's token."""
        self.call('mark_flake_used', MarkFlakeUsed.Request(flake_id=flake_id, token=token, note=note),
                  flake_id=flake_id)

    def stack_recipe(self, recipe_id: str) -> StackRecipe:
        """A stack planned in the web app: layers bottom first, each with its token once reserved there."""
        response = self.call('get_stack_recipe', GetStackRecipe.Request(recipe_id=recipe_id), retry=True)
        return StackRecipe(recipe_id=recipe_id, name=response.name, robot_id=response.robot_id,
                           layers=list(response.layers))

    def mark_stack_used(self, recipe: StackRecipe, note: str = '') -> list[str]:
        """Mark every layer of a reserved recipe used (bottom first); returns the flake ids."""
        missing = [layer.flake_id for layer in recipe.layers if not layer.token]
        if missing:
            raise NotReservedError(NOT_RESERVED, f'recipe {recipe.recipe_id} holds no token for {missing}: reserve it '
                                            'in the web app first')
        for layer in recipe.layers:
            self.mark_used(layer.flake_id, layer.token, note or f'stack {recipe.name}, layer {layer.index}')
        return [layer.flake_id for layer in recipe.layers]

    def revisit_list(self, *, chip_id: str = '', scan_id: str = '', materials: Sequence[str] = (),
                     layer_classes: Sequence[int | str] = (), min_score: float = 0.0, min_homogeneity: float = 0.0,
                     include_revisited: bool = False, limit: int = 0) -> list[Flake]:
        """Flakes worth a high-magnification look, best first (0 or empty: the registry's defaults)."""
        request = GetRevisitList.Request(chip_id=chip_id, scan_id=scan_id, materials=list(materials),
                                         layer_classes=self._numbers(layer_classes, parse_layer_class),
                                         min_score=float(min_score), min_homogeneity=float(min_homogeneity),
                                         include_revisited=bool(include_revisited), limit=self._count('limit', limit))
        return list(self.call('get_revisit_list', request, retry=True).flakes)

    def add_image(self, flake_id: str, role: str, *, path: str = '', pixels=None, objective: str = '',
                  pixel_size: float = 0.0) -> str:
        """Store an image with a flake: ``pixels`` (a sensor_msgs/Image) are written by the registry;
        else ``path`` names a file in the registry's data folder. Returns the stored path."""
        request = AddFlakeImage.Request(flake_id=flake_id, image=FlakeImage(role=role, path=path, objective=objective,
                                                                           pixel_size=float(pixel_size)))
        if pixels is not None:
            request.pixels = pixels
        return self.call('add_flake_image', request, flake_id=flake_id).path

    # -- argument conversion (refused here with the registry's own codes) ------------------

    @staticmethod
    def _numbers(values, parse) -> list[int]:
        if isinstance(values, (str, int)):
            values = [values]
        try:
            return [parse(v) for v in values]
        except RegistryError as error:
            raise error_for(error.code, error.message) from None
        except (TypeError, ValueError) as error:
            raise InvalidArgumentError(INVALID_ARGUMENT, str(error)) from None

    @staticmethod
    def _count(name: str, value: int) -> int:
        try:
            number = operator.index(value)
        except TypeError:
            raise InvalidArgumentError(INVALID_ARGUMENT, f'{name} must be a whole number, got {value!r}') from None
        if not 0 <= number < 2 ** 32:
            raise InvalidRangeError(INVALID_RANGE, f'{name} must be in 0..{2 ** 32 - 1}, got {number}')
        return number

    @staticmethod
    def _floats(name: str, values: Sequence[float], count: int) -> tuple[float, ...]:
        try:
            numbers = tuple(float(v) for v in values)
        except (TypeError, ValueError):
            numbers = ()
        if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
            raise InvalidArgumentError(INVALID_ARGUMENT, f'{name} needs {count} finite numbers [m], got {values!r}')
        return numbers
