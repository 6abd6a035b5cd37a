"""tiler_node: scan frames -> detector tiles, and a mosaic of each scan.

Subscribes /scan/frames, publishes /scan/tiles (ScanFrames whose pixel_to_wafer is
the tile's own map) and, once per scan and every ``mosaic_every`` frames, writes
the scan's mosaic to <data_dir>/scans/<scan_id>/mosaic.png with mosaic.json (the
wafer -> mosaic pixel map) and publishes it on /scan/mosaic. Mosaic work runs in a
worker thread behind a bounded queue so the executor only forwards tiles.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import queue
import threading

import cv2
from rclpy.node import Node
from sensor_msgs.msg import Image

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
from flake_msgs.msg import ScanFrame
from flake_scanner.parameters import TilerNodeParameters
from flake_scanner.scan.tiler import MosaicBuilder, split_frame


class TilerNode(Node):
    def __init__(self):
        super().__init__('tiler_node')
        self.params = declare_parameters(self, TilerNodeParameters)
        self.tile_publisher = self.create_publisher(ScanFrame, 'scan/tiles', PIPELINE_QOS)
        self.mosaic_publisher = self.create_publisher(Image, 'scan/mosaic', LATCHED_QOS)
        self.diagnostics = diagnostics_publisher(self)
        self.create_subscription(ScanFrame, 'scan/frames', self._on_frame, PIPELINE_QOS)
        self.create_timer(1.0, self._publish_diagnostics)
        self.frames_in = 0
        self.tiles_out = 0
        self.mosaic_skipped = 0
        self._mosaics: dict[str, MosaicBuilder] = {}
        self._work: queue.Queue = queue.Queue(maxsize=self.params.mosaic_queue)
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._mosaic_worker, name='mosaic', daemon=True)
        self._worker.start()

    def _data_dir(self) -> Path:
        return Path(self.params.data_dir or os.environ.get('FLAKE_DATA_DIR', 'data'))

    def _on_frame(self, frame: ScanFrame) -> None:
        self.frames_in += 1
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
                for field in ('header', 'scan_id', 'chip_id', 'tile_index', 'tile_row', 'tile_col',
                              'tiles_total', 'objective', 'magnification', 'pixel_size', 'stage_position',
                              'focus_z', 'focus_score', 'revisit', 'revisit_flake_id'):
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
                self._add_to_mosaic(frame, pixels)
            except Exception as error:  # noqa: BLE001 - the worker must outlive one bad frame
                if not self.context.ok():
                    break
                self.get_logger().error(f'mosaic of {frame.scan_id}: {error}')

    def _add_to_mosaic(self, frame: ScanFrame, pixels) -> None:
        builder = self._mosaics.get(frame.scan_id)
        if builder is None:
            builder = self._mosaics[frame.scan_id] = MosaicBuilder(self.params.mosaic_resolution)
            for old in [k for k in self._mosaics if k != frame.scan_id]:
                del self._mosaics[old]
        if pixels is None:
            pixels = image_to_numpy(frame.image, 'bgr8') if frame.image.encoding != 'bgr8' else \
                image_to_numpy(frame.image)
        builder.add(pixels, Affine2D.from_list(frame.pixel_to_wafer))
        last = frame.tiles_total and frame.tile_index + 1 >= frame.tiles_total
        if last or len(builder) % self.params.mosaic_every == 0:
            self._write_mosaic(frame.scan_id, builder)

    def _write_mosaic(self, scan_id: str, builder: MosaicBuilder) -> None:
        mosaic = builder.render()
        folder = self._data_dir() / 'scans' / scan_id
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / 'mosaic.tmp.png'
        cv2.imwrite(str(temporary), mosaic.canvas)
        os.replace(temporary, folder / 'mosaic.png')
        meta = {'scan_id': scan_id, 'frames': len(builder), 'metres_per_pixel': mosaic.metres_per_pixel,
                'wafer_to_mosaic': mosaic.wafer_to_mosaic().as_list(),
                'bounds_wafer': [float(b) for b in builder.bounds]}
        (folder / 'mosaic.json').write_text(json.dumps(meta, indent=1))
        msg = numpy_to_image(mosaic.canvas, 'bgr8')
        msg.header.frame_id = 'wafer'
        msg.header.stamp = self.get_clock().now().to_msg()
        self.mosaic_publisher.publish(msg)

    def _publish_diagnostics(self) -> None:
        level = WARN if self.mosaic_skipped else OK
        publish_diagnostics(self, self.diagnostics, [diagnostic_status(
            'tiler_node: tiling', 'tiler', level, 'mosaic skipped frames' if self.mosaic_skipped else 'ok',
            {'frames_in': self.frames_in, 'tiles_out': self.tiles_out, 'mosaic_queue': self._work.qsize(),
             'mosaic_skipped': self.mosaic_skipped})])

    def close(self) -> None:
        self._stop.set()
        self._worker.join(timeout=5)


def main(args=None):
    run_node(TilerNode, args=args)


if __name__ == '__main__':
    main()
