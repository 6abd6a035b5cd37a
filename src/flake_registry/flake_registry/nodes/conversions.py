"""Conversions between flake_msgs messages and the registry's plain records.

The store never sees a message; the node never builds SQL. Everything that knows
both sides lives here.
"""

from __future__ import annotations

from collections import OrderedDict
import math

from builtin_interfaces.msg import Time
from geometry_msgs.msg import Point, Point32
import numpy as np
from sensor_msgs.msg import RegionOfInterest

from flake_core.ros_image import image_to_numpy, numpy_to_image
from flake_msgs.msg import Flake, FlakeArray, FlakeImage, FlakeObservation
from flake_registry.nodes.request_limits import check_message
from flake_registry.query import FlakeQuery
from flake_registry.store import FlakeImageRecord, FlakeRecord, Observation, Sighting


def to_time(seconds: float | None) -> Time:
    if not seconds or not math.isfinite(seconds):
        return Time()
    sec = math.floor(seconds)
    return Time(sec=int(sec), nanosec=min(int(round((seconds - sec) * 1e9)), 999_999_999))


def from_time(stamp: Time) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def _roi(bbox: tuple[int, int, int, int]) -> RegionOfInterest:
    x, y, w, h = (max(int(v), 0) for v in bbox)
    return RegionOfInterest(x_offset=x, y_offset=y, width=w, height=h)


def detection_from_msg(flake: Flake, array: FlakeArray) -> Sighting:
    """One Flake of a FlakeArray as a registry Sighting; the array fills in scan, tile and time left empty.

    Raises RegistryError for text or lists over the registry's limits (request_limits).
    """
    check_message(flake)
    scan_id = flake.scan_id or array.scan_id
    tile_index = flake.tile_index if flake.scan_id else array.tile_index
    stamp = from_time(flake.header.stamp) or from_time(array.header.stamp)
    mask, mask_width, mask_height = b'', 0, 0
    if flake.mask.data and flake.mask.width and flake.mask.height:
        pixels = image_to_numpy(flake.mask)
        if pixels.ndim == 3:
            pixels = pixels[..., 0]
        mask = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
        mask_height, mask_width = pixels.shape[:2]
    return Sighting(
        chip_id=flake.chip_id, scan_id=scan_id, tile_index=int(tile_index), x=flake.centre.x, y=flake.centre.y,
        material=(flake.material or 'unknown').lower(), layer_class=int(flake.layer_class),
        layers=flake.layers, layers_std=flake.layers_std, thickness_nm=flake.thickness_nm,
        thickness_nm_std=flake.thickness_nm_std, score=flake.score, detector=flake.detector,
        model_version=flake.model_version, contour=[(p.x, p.y) for p in flake.contour.points], area=flake.area,
        bbox_px=(flake.bbox.x_offset, flake.bbox.y_offset, flake.bbox.width, flake.bbox.height),
        homogeneity=flake.homogeneity, isolation_distance=flake.isolation_distance,
        edge_straightness=flake.edge_straightness, stamp=stamp,
        rejected=flake.status == Flake.STATUS_REJECTED, mask=mask, mask_width=mask_width, mask_height=mask_height)


def flake_to_msg(record: FlakeRecord, frame_id: str = 'wafer', contour: bool = True) -> Flake:
    """The record as a Flake; ``contour=False`` leaves the outline out (long query answers)."""
    # Fields are filled in place: a Flake() already holds its sub-messages, and making
    # new ones costs as much again (QueryFlakes builds hundreds per answer).
    msg = Flake()
    msg.header.frame_id = frame_id
    seconds = record.detected_at or record.created
    if seconds and math.isfinite(seconds):
        msg.header.stamp.sec = math.floor(seconds)
        msg.header.stamp.nanosec = min(int((seconds - math.floor(seconds)) * 1e9), 999_999_999)
    msg.id = record.id
    msg.scan_id = record.scan_id
    msg.chip_id = record.chip_id
    msg.tile_index = int(record.tile_index or 0)
    msg.material = record.material
    msg.layer_class = int(record.layer_class or 0)
    msg.layers = float(record.layers or 0.0)
    msg.layers_std = float(record.layers_std or 0.0)
    msg.thickness_nm = float(record.thickness_nm or 0.0)
    msg.thickness_nm_std = float(record.thickness_nm_std or 0.0)
    msg.score = float(record.score)
    msg.detector = record.detector
    msg.model_version = record.model_version
    bbox = msg.bbox
    bbox.x_offset, bbox.y_offset, bbox.width, bbox.height = (max(int(v), 0) for v in record.bbox_px)
    msg.centre.x = float(record.x)
    msg.centre.y = float(record.y)
    if contour:
        msg.contour.points = [Point32(x=float(x), y=float(y), z=0.0) for x, y in record.contour]
    msg.area = float(record.area or 0.0)
    if record.mask:
        pixels = np.frombuffer(record.mask, np.uint8).reshape(record.mask_height, record.mask_width)
        msg.mask = numpy_to_image(pixels, 'mono8')
    msg.homogeneity = float(record.homogeneity or 0.0)
    msg.isolation_distance = float(record.isolation_distance or 0.0)
    msg.edge_straightness = float(record.edge_straightness or 0.0)
    msg.status = int(record.status)
    return msg


def observation_to_msg(observation: Observation) -> FlakeObservation:
    return FlakeObservation(scan_id=observation.scan_id, tile_index=int(observation.tile_index),
                            stamp=to_time(observation.stamp),
                            centre=Point(x=float(observation.x), y=float(observation.y), z=0.0),
                            bbox=_roi(observation.bbox_px), score=float(observation.score),
                            detector=observation.detector)


def image_to_msg(image: FlakeImageRecord) -> FlakeImage:
    return FlakeImage(role=image.role, path=image.path, objective=image.objective,
                      pixel_size=float(image.pixel_size), stamp=to_time(image.stamp))


def query_from_request(request, default_limit: int) -> FlakeQuery:
    """A QueryFlakes request as a FlakeQuery (zero upper bounds mean "none", as the .srv says)."""
    return FlakeQuery(
        materials=(request.material,) if request.material else (),
        chip_id=request.chip_id, scan_id=request.scan_id,
        layer_classes=tuple(int(v) for v in request.layer_classes),
        layers_min=request.layers_min or None, layers_max=request.layers_max or None,
        thickness_nm_min=request.thickness_nm_min or None, thickness_nm_max=request.thickness_nm_max or None,
        area_min=request.area_min or None, area_max=request.area_max or None,
        min_score=request.min_score or None, min_homogeneity=request.min_homogeneity or None,
        statuses=tuple(int(v) for v in request.statuses),
        region=((request.region_min_x, request.region_min_y, request.region_max_x, request.region_max_y)
                if request.use_region else None),
        near=((request.near.x, request.near.y) if request.use_distance or request.sort_by == 'distance'
              else None),
        max_distance=request.max_distance if request.use_distance else None,
        sort_by=request.sort_by or 'score',
        # The .srv: "default is descending; distance sorts ascending" - a bool cannot say
        # "unset", so ascending=False leaves the key's natural order.
        ascending=True if request.ascending else None,
        limit=int(request.limit) or default_limit, offset=int(request.offset))


class FlakeMessageCache:
    """Flake messages already built, reused while their flake is unchanged.

    Building a Flake in Python costs most of a QueryFlakes answer; robots ask for
    the same candidates again and again. The key holds everything a message shows
    that can change (the store's ``updated`` time, the effective status, the
    holder and lease), so a changed flake is simply built again; old entries age out.
    """

    def __init__(self, size: int):
        self.size = size
        self.hits = 0
        self.misses = 0
        self._messages: OrderedDict[tuple, Flake] = OrderedDict()

    def message(self, record: FlakeRecord, contour: bool = False) -> Flake:
        if self.size <= 0:
            return flake_to_msg(record, contour=contour)
        key = (record.id, record.updated, record.status, record.reserved_by, record.lease_expires,
               record.n_observations, record.revisited_at, contour)
        msg = self._messages.get(key)
        if msg is not None:
            self._messages.move_to_end(key)
            self.hits += 1
            return msg
        self.misses += 1
        msg = flake_to_msg(record, contour=contour)
        self._messages[key] = msg
        if len(self._messages) > self.size:
            self._messages.popitem(last=False)
        return msg
