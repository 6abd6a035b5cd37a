"""Book-keeping of one scan: timings, the hardware's own time, detection progress (pure core)."""

from __future__ import annotations

from dataclasses import dataclass, field
import math
import time


def trapezoid_move_time(distance: float, speed: float, acceleration: float) -> float:
    """Time an axis needs to travel ``distance`` with a trapezoidal velocity profile [s]."""
    distance = abs(distance)
    if distance == 0.0:
        return 0.0
    if speed <= 0 or acceleration <= 0:
        raise ValueError('speed and acceleration must be positive')
    ramp = speed / acceleration  # time to reach full speed
    ramp_distance = speed * ramp  # accelerate + decelerate together
    if distance <= ramp_distance:
        return 2.0 * math.sqrt(distance / acceleration)
    return 2.0 * ramp + (distance - ramp_distance) / speed


@dataclass
class HardwareModel:
    """The stage's and camera's own timing: what a scan costs with zero software overhead."""

    speed: float = 5e-3          # [m/s]
    acceleration: float = 50e-3  # [m/s^2]
    settle: float = 0.05         # [s] after every move
    exposure: float = 0.01       # [s] per frame
    readout: float = 0.0         # [s] per frame, sensor readout / transfer
    z_speed: float = 1e-3        # [m/s]
    z_acceleration: float = 50e-3  # [m/s^2]

    def move_time(self, from_xy: tuple[float, float], to_xy: tuple[float, float]) -> float:
        """XY axes move together, so the slower axis sets the time; then the stage settles."""
        dx, dy = to_xy[0] - from_xy[0], to_xy[1] - from_xy[1]
        if dx == 0.0 and dy == 0.0:
            return 0.0
        return max(trapezoid_move_time(dx, self.speed, self.acceleration),
                   trapezoid_move_time(dy, self.speed, self.acceleration)) + self.settle

    def z_move_time(self, dz: float) -> float:
        """A focus step: the z axis alone, then the stage settles."""
        if dz == 0.0:
            return 0.0
        return trapezoid_move_time(dz, self.z_speed, self.z_acceleration) + self.settle

    def frame_time(self) -> float:
        return self.exposure + self.readout


@dataclass
class ScanProgress:
    """Counters and timings the Scan action reports as feedback and result."""

    scan_id: str
    tiles_total: int
    started: float = field(default_factory=time.monotonic)
    tiles_done: int = 0
    frames_published: int = 0
    tiles_detected: set = field(default_factory=set)  # tile indices whose detections arrived
    flakes_found: int = 0
    flakes_revisited: int = 0
    move_time: float = 0.0          # wall time spent in moves [s]
    focus_time: float = 0.0         # wall time spent focusing [s]
    capture_time: float = 0.0       # wall time spent capturing [s]
    hardware_time: float = 0.0      # the hardware's own time (model) [s]
    exposure_time: float = 0.0
    last_capture: float = 0.0
    last_detection: float = 0.0

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def detection_complete(self) -> bool:
        return len(self.tiles_detected) >= self.frames_published

    @property
    def detection_lag(self) -> float:
        if not self.last_detection or not self.last_capture:
            return 0.0
        return max(0.0, self.last_detection - self.last_capture)
