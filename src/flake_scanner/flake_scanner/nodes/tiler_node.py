"""tiler_node: scan frames -> detector tiles, a mosaic of each scan, and the frames kept.

Subscribes /scan/frames, publishes /scan/tiles (ScanFrames whose pixel_to_wafer is
the tile's own map) and, once per scan and every ``mosaic_every`` frames, writes
the scan's mosaic to <data_dir>/scans/<scan_id>/mosaic.png with mosaic.json (the
wafer -> mosaic pixel map) and publishes it on /scan/mosaic. Overlapping frames are
blended (``mosaic_blend_px``) after the shading they share is divided out, so the
mosaic shows no seams. Each scan frame is kept at full resolution as
<data_dir>/scans/<scan_id>/frames/<tile>.jpg (``keep_frames``, at most
``frames_max_megabytes`` for all scans) and announced on registry/frames (a ScanFrame
without pixels), where the registry records it. Mosaic and frame work run in a worker
thread behind a bounded queue so the executor only forwards tiles. Revisit captures
(high magnification) go to the detector binned ``revisit_binning`` x ``revisit_binning``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import queue
import threading
import time

import cv2
import numpy as np
from rclpy.node import Node
from sensor_msgs.msg import Image

from flake_core.data_files import data_dir, frame_file, scan_folder
from flake_core.geometry import Affine2D
from flake_core.node_tools import (
    LATCHED_QOS,
    OK,
    PIPELINE_QOS,
    WARN,
    declare_parameters,
    diagnostic_status,
    diagnostics_publisher,
    publish_diagnostics,
    run_node,
)
from flake_core.ros_image import image_to_numpy, numpy_to_image
from flake_core.units import local_time
from flake_msgs.msg import ScanFrame
from flake_scanner.parameters import TilerNodeParameters
from flake_scanner.scan.tiler import MosaicBuilder, bin_frame, split_frame

# What a tile (or a frame's record) keeps of its frame besides pixels and geometry.
FRAME_FIELDS = ('header', 'scan_id', 'chip_id', 'tile_index', 'tile_row', 'tile_col', 'tiles_total', 'objective',
                'magnification', 'pixel_size', 'stage_position', 'focus_z', 'focus_score', 'revisit',
                'revisit_flake_id')


class TilerNode(Node):
    def __init__(self, **kwargs):
        super().__init__('tiler_node', **kwargs)
        self.params = declare_parameters(self, TilerNodeParameters)
        self.tile_publisher = self.create_publisher(ScanFrame, 'scan/tiles', PIPELINE_QOS)
        self.mosaic_publisher = self.create_publisher(Image, 'scan/mosaic', LATCHED_QOS)
        self.frame_record_publisher = self.create_publisher(ScanFrame, 'registry/frames', PIPELINE_QOS)
        self.diagnostics = diagnostics_publisher(self)
        self.create_subscription(ScanFrame, 'scan/frames', self._on_frame, PIPELINE_QOS)
        self.create_timer(1.0, self._publish_diagnostics)
        self.frames_in = 0
        self.tiles_out = 0
        self.mosaic_skipped = 0
        self.frames_kept = 0
        self.frames_not_kept = 0
        self._frames_bytes: int | None = None   # kept frames on disk, counted once at the first frame
        self._mosaics: dict[str, MosaicBuilder] = {}
        self._work: queue.Queue = queue.Queue(maxsize=self.params.mosaic_queue)
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._mosaic_worker, name='mosaic', daemon=True)
        self._worker.start()

    def _data_dir(self) -> Path:
        return data_dir(self.params.data_dir)

    def _on_frame(self, frame: ScanFrame) -> None:
        self.frames_in += 1
        if frame.revisit and self.params.revisit_binning > 1:
            frame = self._binned(frame, self.params.revisit_binning)
        to_wafer = Affine2D.from_list(frame.pixel_to_wafer)
        size = self.params.tile_size
        if size == 0 or (size >= frame.image.width and size >= frame.image.height):
            self.tile_publisher.publish(frame)
            self.tiles_out += 1
            pixels = None
        else:
            pixels = image_to_numpy(frame.image)
            for tile in split_frame(pixels, to_wafer, size, self.params.tile_overlap):
                out = ScanFrame()
                for field in FRAME_FIELDS:
                    setattr(out, field, getattr(frame, field))
                out.image = numpy_to_image(tile.pixels, frame.image.encoding, header=frame.image.header)
                out.pixel_to_wafer = tile.pixel_to_wafer.as_list()
                centre = tile.pixel_to_wafer.apply((tile.pixels.shape[1] - 1) / 2, (tile.pixels.shape[0] - 1) / 2)
                out.wafer_position.x, out.wafer_position.y = centre
                self.tile_publisher.publish(out)
                self.tiles_out += 1
        if frame.revisit:
            return
        try:
            self._work.put_nowait((frame, pixels))
        except queue.Full:
            # The mosaic is a picture for people; detection tiles were already sent on.
            self.mosaic_skipped += 1
            self.get_logger().warning('mosaic worker behind; frame left out of the mosaic',
                                      throttle_duration_sec=5.0)

    def _mosaic_worker(self) -> None:
        while not self._stop.is_set():
            try:
                frame, pixels = self._work.get(timeout=0.2)
            except queue.Empty:
                continue
            if not self.context.ok():
                break  # Ctrl-C: the publishers are going away
            try:
                pixels = self._pixels(frame, pixels)
                if self.params.keep_frames:
                    self._keep_frame(frame, pixels)
                self._add_to_mosaic(frame, pixels)
            except Exception as error:  # noqa: BLE001 - the worker must outlive one bad frame
                if not self.context.ok():
                    break
                self.get_logger().error(f'mosaic of {frame.scan_id}: {error}')

    @staticmethod
    def _binned(frame: ScanFrame, factor: int) -> ScanFrame:
        """A copy of ``frame`` binned ``factor`` x ``factor`` (its pixel size and map to match)."""
        pixels, to_wafer = bin_frame(image_to_numpy(frame.image), Affine2D.from_list(frame.pixel_to_wafer), factor)
        out = ScanFrame()
        for field in FRAME_FIELDS:
            setattr(out, field, getattr(frame, field))
        out.image = numpy_to_image(np.ascontiguousarray(pixels), frame.image.encoding, header=frame.image.header)
        out.pixel_to_wafer = to_wafer.as_list()
        out.pixel_size = frame.pixel_size * factor
        return out

    @staticmethod
    def _pixels(frame: ScanFrame, pixels):
        if pixels is not None and pixels.ndim == 3:
            return pixels
        return image_to_numpy(frame.image, 'bgr8') if frame.image.encoding != 'bgr8' else image_to_numpy(frame.image)

    def _kept_bytes(self) -> int:
        if self._frames_bytes is None:
            scans = self._data_dir() / 'scans'
            self._frames_bytes = sum(p.stat().st_size for p in scans.glob('*/frames/*.jpg')) if scans.is_dir() else 0
        return self._frames_bytes

    def _keep_frame(self, frame: ScanFrame, pixels) -> None:
        """Write the frame as JPEG and announce it for the registry; nothing beyond the disk budget."""
        budget = self.params.frames_max_megabytes * 1e6
        if self._kept_bytes() >= budget:
            self.frames_not_kept += 1
            self.get_logger().warning(
                f'kept frames take {self._kept_bytes() / 1e6:.0f} MB, the most frames_max_megabytes allows: frame '
                f'{frame.tile_index} of {frame.scan_id} not kept', throttle_duration_sec=30.0)
            return
        relative = frame_file(frame.scan_id, frame.tile_index)
        path = self._data_dir() / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        ok, data = cv2.imencode('.jpg', pixels, [cv2.IMWRITE_JPEG_QUALITY, self.params.frame_jpeg_quality])
        if not ok:
            raise ValueError('JPEG encoding failed')
        temporary = path.with_suffix('.tmp.jpg')
        temporary.write_bytes(data.tobytes())
        os.replace(temporary, path)  # never a half-written frame under the final name
        self._frames_bytes = self._kept_bytes() + len(data)
        self.frames_kept += 1
        record = ScanFrame()
        for field in (*FRAME_FIELDS, 'wafer_position', 'pixel_to_wafer'):
            setattr(record, field, getattr(frame, field))
        # The geometry without the pixels: the registry finds them at frame_file(scan, tile).
        record.image.header = frame.image.header
        record.image.width, record.image.height = frame.image.width, frame.image.height
        record.image.encoding = 'jpeg'
        self.frame_record_publisher.publish(record)

    def _add_to_mosaic(self, frame: ScanFrame, pixels) -> None:
        builder = self._mosaics.get(frame.scan_id)
        if builder is None:
            builder = self._mosaics[frame.scan_id] = MosaicBuilder(self.params.mosaic_resolution,
                                                                   blend_px=self.params.mosaic_blend_px)
            for old in [k for k in self._mosaics if k != frame.scan_id]:
                del self._mosaics[old]
        builder.add(pixels, Affine2D.from_list(frame.pixel_to_wafer))
        last = frame.tiles_total and frame.tile_index + 1 >= frame.tiles_total
        if last or len(builder) % self.params.mosaic_every == 0:
            self._write_mosaic(frame.scan_id, builder)

    def _write_mosaic(self, scan_id: str, builder: MosaicBuilder) -> None:
        mosaic = builder.render()
        folder = self._data_dir() / scan_folder(scan_id)
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / 'mosaic.tmp.png'
        cv2.imwrite(str(temporary), mosaic.canvas)
        os.replace(temporary, folder / 'mosaic.png')
        meta = {'scan_id': scan_id, 'frames': len(builder), 'written_local_time': local_time(time.time()),
                'metres_per_pixel': mosaic.metres_per_pixel,
                'wafer_to_mosaic': mosaic.wafer_to_mosaic().as_list(),
                'bounds_wafer': [float(b) for b in builder.bounds]}
        (folder / 'mosaic.json').write_text(json.dumps(meta, indent=1))
        msg = numpy_to_image(mosaic.canvas, 'bgr8')
        msg.header.frame_id = 'wafer'
        msg.header.stamp = self.get_clock().now().to_msg()
        self.mosaic_publisher.publish(msg)

    def _publish_diagnostics(self) -> None:
        level = WARN if self.mosaic_skipped or self.frames_not_kept else OK
        message = ('mosaic skipped frames' if self.mosaic_skipped else
                   'frames not kept: frames_max_megabytes reached' if self.frames_not_kept else 'ok')
        publish_diagnostics(self, self.diagnostics, [diagnostic_status(
            'tiler_node: tiling', 'tiler', level, message,
            {'frames_in': self.frames_in, 'tiles_out': self.tiles_out, 'mosaic_queue': self._work.qsize(),
             'mosaic_skipped': self.mosaic_skipped, 'frames_kept': self.frames_kept,
             'frames_not_kept': self.frames_not_kept,
             'frames_megabytes': round((self._frames_bytes or 0) / 1e6, 1)})])

    def close(self) -> None:
        self._stop.set()
        self._worker.join(timeout=5)


def main(args=None):
    run_node(TilerNode, args=args)


if __name__ == '__main__':
    main()
