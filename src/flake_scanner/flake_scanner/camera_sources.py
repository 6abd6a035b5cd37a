"""Frame sources behind camera_node: the simulated microscope, an OpenCV device, an image folder.

Pure core (no rclpy): each source returns bgr8 frames as numpy arrays. The simulated
source renders at the stage pose it is given; a pose with a velocity (the stage was
still moving during the exposure) is smeared along the motion, as a real camera would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
import math
from pathlib import Path
import threading

import cv2
import numpy as np

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp')
MAX_MOTION_BLUR_PX = 151


class CameraError(RuntimeError):
    """A camera that cannot be opened or stopped delivering frames."""


@dataclass(frozen=True)
class StagePose:
    """Where the stage was during the exposure [m] and how fast it moved [m/s]."""

    x: float = 0.0
    y: float = 0.0
    z: float = 0.0
    vx: float = 0.0
    vy: float = 0.0


def motion_blur(image: np.ndarray, vx: float, vy: float, exposure: float, pixel_size: float) -> np.ndarray:
    """Smear ``image`` along the stage motion during the exposure.

    Stage +x is image +u and stage +y is image -v (flake_core.geometry); the scene
    moves opposite to the stage, but a symmetric line kernel makes the sign irrelevant.
    """
    length = math.hypot(vx, vy) * exposure / pixel_size
    if length < 1.0:
        return image
    size = min(int(math.ceil(length)) | 1, MAX_MOTION_BLUR_PX)
    kernel = np.zeros((size, size), np.float32)
    centre = size // 2
    angle = math.atan2(-vy, vx)
    half = (size - 1) / 2
    end = (int(round(centre + half * math.cos(angle))), int(round(centre + half * math.sin(angle))))
    start = (int(round(centre - half * math.cos(angle))), int(round(centre - half * math.sin(angle))))
    cv2.line(kernel, start, end, 1.0, 1)
    kernel /= kernel.sum()
    return cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_REFLECT)


class SimulatedSource:
    """The simulated microscope (flake_scanner.sim.camera) looking at a seeded virtual wafer."""

    def __init__(self, width: int, height: int, objective: str, exposure: float, gain: float,
                 pixel_pitch: float, seed: int, oxide_nm: float = 90.0, motion_blur: bool = True):
        from flake_scanner.sim.camera import CameraModel, CameraSettings
        from flake_scanner.sim.wafer import VirtualWafer

        self.wafer = VirtualWafer.generate(seed=seed, oxide_nm=oxide_nm)
        self.model = CameraModel(self.wafer, CameraSettings(
            width=width, height=height, objective=objective, exposure_s=exposure, gain=gain,
            pixel_pitch_um=pixel_pitch * 1e6, seed=seed))
        self.motion_blur = motion_blur
        self._lock = threading.Lock()

    @property
    def pixel_size(self) -> float:
        return self.model.pixel_size

    def configure(self, **changes) -> None:
        """Change settings: objective, exposure [s], gain."""
        mapping = {'objective': 'objective', 'exposure': 'exposure_s', 'gain': 'gain'}
        settings = {mapping[k]: v for k, v in changes.items() if k in mapping}
        if settings:
            with self._lock:
                self.model.with_settings(**settings)

    def grab(self, pose: StagePose) -> np.ndarray:
        with self._lock:
            image = self.model.render(pose.x, pose.y, pose.z)
            exposure, pixel_size = self.model.settings.exposure_s, self.model.pixel_size
        if self.motion_blur and (pose.vx or pose.vy):
            image = motion_blur(image, pose.vx, pose.vy, exposure, pixel_size)
        return image

    def close(self) -> None:
        pass


class OpenCVSource:
    """A camera opened with cv2.VideoCapture: a device index ("0") or a URL/pipeline string."""

    def __init__(self, device: str, width: int, height: int, exposure: float, gain: float):
        self.device = device
        target = int(device) if device.strip().isdigit() else device
        self.capture = cv2.VideoCapture(target)
        if not self.capture.isOpened():
            raise CameraError(f'cannot open camera {device!r} with OpenCV (index or URL)')
        self.capture.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        self.capture.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        self.configure(exposure=exposure, gain=gain)

    def configure(self, **changes) -> None:
        # Drivers differ in units and may ignore these properties; V4L2 takes exposure in 100 us.
        if 'exposure' in changes:
            self.capture.set(cv2.CAP_PROP_EXPOSURE, changes['exposure'] * 1e4)
        if 'gain' in changes:
            self.capture.set(cv2.CAP_PROP_GAIN, changes['gain'])

    def grab(self, pose: StagePose) -> np.ndarray:
        ok, frame = self.capture.read()
        if not ok or frame is None:
            raise CameraError(f'camera {self.device!r} delivered no frame')
        if frame.ndim == 2:
            frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
        return frame

    def close(self) -> None:
        self.capture.release()


class FolderSource:
    """Images from a directory, in name order, looping (replaying a recorded session)."""

    def __init__(self, folder: str | Path, suffixes: Sequence[str] = IMAGE_SUFFIXES):
        directory = Path(folder)
        if not directory.is_dir():
            raise CameraError(f'image folder {str(folder)!r} does not exist')
        self.files = sorted(p for p in directory.iterdir() if p.suffix.lower() in suffixes)
        if not self.files:
            raise CameraError(f'image folder {str(folder)!r} holds no {"/".join(suffixes)} images')
        self.index = 0

    def configure(self, **changes) -> None:
        pass

    def grab(self, pose: StagePose) -> np.ndarray:
        path = self.files[self.index % len(self.files)]
        self.index += 1
        frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if frame is None:
            raise CameraError(f'cannot read image {path.name}')
        return frame

    def close(self) -> None:
        pass
