"""Conversion between ``sensor_msgs/Image`` and numpy arrays with cv_bridge's semantics.

Every node converts images through this module. When a ROS 2 install provides
``cv_bridge`` it is used; otherwise (the pip-only install) the same behaviour is
implemented here: encodings, row ``step`` with padding, and endianness.

Speed matters for multi-megabyte frames: ``Image.data`` is filled from ``bytes``
and read back with ``np.frombuffer`` (no copy), because assigning numpy arrays or
lists to message fields costs 50-170 ms per frame in rclpy.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

# encoding -> (numpy dtype, channels); the names and layouts cv_bridge uses.
ENCODINGS: dict[str, tuple[np.dtype, int]] = {
    'bgr8': (np.dtype(np.uint8), 3),
    'rgb8': (np.dtype(np.uint8), 3),
    'bgra8': (np.dtype(np.uint8), 4),
    'rgba8': (np.dtype(np.uint8), 4),
    'mono8': (np.dtype(np.uint8), 1),
    'mono16': (np.dtype(np.uint16), 1),
    'bgr16': (np.dtype(np.uint16), 3),
    'rgb16': (np.dtype(np.uint16), 3),
    '8UC1': (np.dtype(np.uint8), 1),
    '8UC3': (np.dtype(np.uint8), 3),
    '8UC4': (np.dtype(np.uint8), 4),
    '16UC1': (np.dtype(np.uint16), 1),
    '32FC1': (np.dtype(np.float32), 1),
    '64FC1': (np.dtype(np.float64), 1),
}

_COLOUR_ORDER = {'bgr8': 'bgr', 'rgb8': 'rgb', 'bgra8': 'bgra', 'rgba8': 'rgba',
                 'bgr16': 'bgr', 'rgb16': 'rgb'}
_HOST_BIG_ENDIAN = sys.byteorder == 'big'


class ImageConversionError(ValueError):
    """An image message or array that cannot be converted, with the reason."""


def _cv_bridge() -> Any:
    try:
        from cv_bridge import CvBridge
    except Exception:  # noqa: BLE001 - any failure (absent, NumPy-2 ABI break) means "not usable"
        return None
    return CvBridge()


_BRIDGE: Any = None
_BRIDGE_CHECKED = False


def _bridge() -> Any:
    global _BRIDGE, _BRIDGE_CHECKED
    if not _BRIDGE_CHECKED:
        _BRIDGE = _cv_bridge()
        _BRIDGE_CHECKED = True
    return _BRIDGE


def encoding_info(encoding: str) -> tuple[np.dtype, int]:
    """Return (dtype, channels) of a supported encoding or raise ImageConversionError."""
    try:
        return ENCODINGS[encoding]
    except KeyError:
        raise ImageConversionError(
            f'unsupported image encoding {encoding!r}; supported: {", ".join(sorted(ENCODINGS))}'
        ) from None


def image_to_numpy(msg: Any, desired_encoding: str = 'passthrough') -> np.ndarray:
    """Return the pixels of an Image message as an (H, W) or (H, W, C) array.

    The result may share memory with ``msg.data``; copy it before writing to it.
    """
    if desired_encoding == 'passthrough' or desired_encoding == msg.encoding:
        desired = None
    else:
        desired = desired_encoding
    bridge = _bridge()
    if bridge is not None:
        pixels: np.ndarray = bridge.imgmsg_to_cv2(msg, desired_encoding or 'passthrough')
        return pixels

    dtype, channels = encoding_info(msg.encoding)
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    row_bytes = width * channels * dtype.itemsize
    if height == 0 or width == 0:
        raise ImageConversionError(f'empty image ({width}x{height})')
    if step < row_bytes:
        raise ImageConversionError(
            f'step {step} is smaller than one row of {width} px x {channels} ch x {dtype.itemsize} B')
    buffer = np.frombuffer(msg.data, dtype=np.uint8)
    if buffer.size < step * (height - 1) + row_bytes:
        raise ImageConversionError(
            f'data holds {buffer.size} bytes, {height} rows of step {step} need {step * height}')
    rows = buffer[: step * height].reshape(height, step)[:, :row_bytes]
    pixels = rows.view(dtype) if rows.flags.c_contiguous else np.ascontiguousarray(rows).view(dtype)
    if dtype.itemsize > 1 and bool(msg.is_bigendian) != _HOST_BIG_ENDIAN:
        pixels = pixels.byteswap()
    shape = (height, width) if channels == 1 else (height, width, channels)
    pixels = pixels.reshape(shape)
    if desired is not None:
        pixels = convert_encoding(pixels, msg.encoding, desired)
    return pixels


def convert_encoding(pixels: np.ndarray, source: str, target: str) -> np.ndarray:
    """Convert pixels between colour orders and grey levels, as cv_bridge's cvtColor does."""
    if source == target:
        return pixels
    import cv2

    src_order = _COLOUR_ORDER.get(source, 'mono' if ENCODINGS.get(source, (None, 0))[1] == 1 else None)
    dst_order = _COLOUR_ORDER.get(target, 'mono' if ENCODINGS.get(target, (None, 0))[1] == 1 else None)
    if src_order is None or dst_order is None:
        raise ImageConversionError(f'cannot convert {source} to {target}')
    src_dtype, _ = encoding_info(source)
    dst_dtype, _ = encoding_info(target)
    codes = {
        ('bgr', 'rgb'): cv2.COLOR_BGR2RGB, ('rgb', 'bgr'): cv2.COLOR_RGB2BGR,
        ('bgr', 'mono'): cv2.COLOR_BGR2GRAY, ('rgb', 'mono'): cv2.COLOR_RGB2GRAY,
        ('mono', 'bgr'): cv2.COLOR_GRAY2BGR, ('mono', 'rgb'): cv2.COLOR_GRAY2RGB,
        ('bgra', 'bgr'): cv2.COLOR_BGRA2BGR, ('rgba', 'rgb'): cv2.COLOR_RGBA2RGB,
        ('bgra', 'rgb'): cv2.COLOR_BGRA2RGB, ('rgba', 'bgr'): cv2.COLOR_RGBA2BGR,
        ('bgr', 'bgra'): cv2.COLOR_BGR2BGRA, ('rgb', 'rgba'): cv2.COLOR_RGB2RGBA,
        ('bgra', 'mono'): cv2.COLOR_BGRA2GRAY, ('rgba', 'mono'): cv2.COLOR_RGBA2GRAY,
    }
    out = pixels
    if src_order != dst_order:
        code = codes.get((src_order, dst_order))
        if code is None:
            raise ImageConversionError(f'cannot convert {source} to {target}')
        out = cv2.cvtColor(np.ascontiguousarray(out), code)
    if src_dtype != dst_dtype:
        out = _rescale_depth(out, src_dtype, dst_dtype)
    return out


def _rescale_depth(pixels: np.ndarray, source: np.dtype, target: np.dtype) -> np.ndarray:
    if source == np.uint16 and target == np.uint8:
        return (pixels >> 8).astype(np.uint8)
    if source == np.uint8 and target == np.uint16:
        return pixels.astype(np.uint16) << 8
    return pixels.astype(target)


def numpy_to_image(pixels: np.ndarray, encoding: str, header: Any = None, msg: Any = None) -> Any:
    """Build (or fill ``msg``) a sensor_msgs/Image from an array, with step = one packed row."""
    bridge = _bridge()
    if bridge is not None:
        out = bridge.cv2_to_imgmsg(np.ascontiguousarray(pixels), encoding)
        if header is not None:
            out.header = header
        return out
    dtype, channels = encoding_info(encoding)
    if pixels.size == 0:
        raise ImageConversionError('cannot convert an empty array to an image')
    if pixels.dtype != dtype:
        raise ImageConversionError(f'{encoding} needs dtype {dtype}, got {pixels.dtype}')
    got_channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    if pixels.ndim not in (2, 3) or got_channels != channels:
        raise ImageConversionError(
            f'{encoding} needs {channels} channel(s), got an array of shape {pixels.shape}')
    if msg is None:
        from sensor_msgs.msg import Image

        msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(pixels.shape[0]), int(pixels.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = int(_HOST_BIG_ENDIAN and dtype.itemsize > 1)
    msg.step = int(msg.width * channels * dtype.itemsize)
    msg.data = np.ascontiguousarray(pixels).tobytes()
    return msg
