"""Parameter schemas of the scanner's nodes (flake_core.parameters): the one source of their
declared parameters, the typed views the nodes read, the YAML checks and docs/parameters.md."""

from __future__ import annotations

from dataclasses import dataclass
import math

from flake_core.objectives import OBJECTIVES
from flake_core.parameters import param
from flake_scanner.autofocus import FOCUS_MEASURES
from flake_scanner.bag.io import BAG_VERSIONS, STORAGES

BAUD_RATES = (9600, 19200, 28800, 57600, 115200)
FOCUS_STRATEGIES = ('autofocus', 'focus_map', 'fixed')


def _limits_error(value) -> str | None:
    values = list(value)
    if len(values) != 6:
        return f'limits must be [x_min, x_max, y_min, y_max, z_min, z_max] in metres, got {values}'
    for axis, (low, high) in zip('xyz', (values[0:2], values[2:4], values[4:6]), strict=True):
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            return f'{axis} limits must be finite with min < max, got [{low}, {high}]'
    return None


@dataclass(frozen=True)
class StageNodeParameters:
    """Parameters of the ``stage_node`` node."""

    port: str = param('',
          'serial port of the controller, e.g. /dev/ttyUSB0 or /dev/serial/by-id/...; ignored when emulate is true',
          read_only=True)
    emulate: bool = param(True,
          'start an in-process MS-2000 emulator on a pty and use it (simulated hardware)',
          read_only=True)
    baudrate: int = param(115200,
          'serial baud rate (MS-2000 default 9600, often set to 115200)',
          choices=BAUD_RATES, read_only=True)
    timeout: float = param(0.2,
          'time to wait for one reply [s]; after a missed one the line must stay quiet twice as long before the '
          'driver speaks again',
          minimum=0.01, maximum=10.0)
    retries: int = param(3, 'resends of a command after a lost or garbled reply', minimum=0, maximum=20)
    reconnect_attempts: int = param(5, 'reopen attempts after an I/O error before giving up', minimum=0, maximum=100)
    reconnect_delay: float = param(0.2, 'pause before each reopen attempt [s]', minimum=0.0, maximum=10.0)
    limits: list[float] = param([-0.05, 0.05, -0.05, 0.05, -0.005, 0.005],
          'travel limits [x_min, x_max, y_min, y_max, z_min, z_max] [m]',
          validator=_limits_error, read_only=True)
    speed: float = param(5e-3, 'x/y speed [m/s]', minimum=1e-6, maximum=0.1)
    z_speed: float = param(1e-3, 'z speed [m/s]', minimum=1e-7, maximum=0.05)
    max_speed: float = param(0.02,
          'fastest x/y speed the stage accepts, from `speed` or a MoveStage request [m/s]',
          minimum=1e-6, maximum=0.1, read_only=True)
    max_z_speed: float = param(5e-3, 'fastest z speed the stage accepts [m/s]', minimum=1e-7, maximum=0.05,
          read_only=True)
    position_tolerance: float = param(1e-6,
          'a waited move succeeds only when the controller reports the stage this close to the target on '
          'every axis [m]',
          minimum=1e-7, maximum=1e-3)
    require_homing: bool = param(False, 'refuse moves until the stage was homed', read_only=True)
    home_on_configure: bool = param(False, 'home all axes when configuring (clear the travel first)', read_only=True)
    poll_rate: float = param(20.0, 'rate of position reads and /stage/state messages [Hz]', minimum=0.5, maximum=200.0)
    move_timeout: float = param(60.0, 'longest a waited move may take [s]', minimum=0.1, maximum=3600.0)
    diagnostics_period: float = param(1.0, 'period of /diagnostics messages [s]', minimum=0.1, maximum=60.0)
    emulator_time_scale: float = param(1.0,
          'emulated seconds per real second (tests run motion faster)',
          minimum=0.01, maximum=1000.0, read_only=True)
    emulator_settle_time: float = param(0.02,
          'emulated settle time after each move [s]',
          minimum=0.0, maximum=5.0, read_only=True)


@dataclass(frozen=True)
class CameraNodeParameters:
    """Parameters of the ``camera_node`` node."""

    backend: str = param('sim', 'frame source', choices=('sim', 'opencv', 'folder'), read_only=True)
    device: str = param('0', 'opencv backend: device index ("0") or URL / GStreamer pipeline', read_only=True)
    folder: str = param('', 'folder backend: directory of images, replayed in name order', read_only=True)
    rate: float = param(2.0,
          'free-running frame rate [Hz]; 0 publishes only on /camera/capture',
          minimum=0.0, maximum=200.0)
    width: int = param(1024,
          'image width [px] (requested from opencv devices)',
          minimum=16, maximum=8192, read_only=True)
    height: int = param(1024,
          'image height [px] (requested from opencv devices)',
          minimum=16, maximum=8192, read_only=True)
    exposure: float = param(0.01, 'exposure time [s]', minimum=1e-6, maximum=10.0)
    gain: float = param(1.0, 'sensor gain', minimum=0.01, maximum=100.0)
    objective: str = param('10x', 'objective in use (sets the pixel size at the sample)', choices=tuple(OBJECTIVES))
    pixel_pitch: float = param(5.5e-6,
          'sensor pixel pitch [m]; pixel size at the sample = pitch / magnification',
          minimum=5e-7, maximum=5e-5, read_only=True)
    sim_seed: int = param(0,
          'sim backend: virtual wafer and noise seed',
          minimum=0, maximum=2 ** 31 - 1, read_only=True)
    sim_oxide_nm: float = param(90.0,
          'sim backend: SiO2 thickness of the virtual wafer [nm]',
          choices=(90.0, 285.0), read_only=True)
    motion_blur: bool = param(True, 'sim backend: smear frames exposed while the stage moves')
    diagnostics_period: float = param(1.0, 'period of /diagnostics messages [s]', minimum=0.1, maximum=60.0)


@dataclass(frozen=True)
class AutofocusNodeParameters:
    """Parameters of the ``autofocus_node`` node."""

    search_range: float = param(0.0,
          'full z range searched when the goal gives 0 [m]; 0 = search_range_dof depths of field of the objective '
          'in use',
          minimum=0.0, maximum=5e-3)
    search_range_dof: float = param(8.0,
          'default search range in depths of field of the objective in use (8 x 6.1 um = 49 um at 10x, 6.9 um at 50x)',
          minimum=2.0, maximum=200.0)
    objective: str = param('10x',
          'objective the camera starts with; later switches of the camera node\'s "objective" parameter are followed',
          choices=tuple(OBJECTIVES))
    camera_node: str = param('camera_node', 'name of the camera node whose objective is followed')
    measure: str = param('tenengrad', 'focus measure when the goal gives none', choices=tuple(FOCUS_MEASURES))
    max_frames: int = param(15, 'frame budget when the goal gives 0', minimum=3, maximum=500)
    coarse_frames: int = param(7, 'frames of the coarse sweep before refinement', minimum=3, maximum=100)
    tolerance: float = param(0.0,
          'stop refining once the bracket is narrower than this [m]; 0 = a quarter of the depth of field of the '
          'objective in use',
          minimum=0.0, maximum=1e-3)
    min_peak_ratio: float = param(1.2,
          'best/lowest focus score below which the field is taken to hold nothing to focus on; the stage then '
          'returns to the search centre',
          minimum=1.0, maximum=100.0)
    step_during_readout: bool = param(True,
          'move to the next z of the coarse sweep as soon as an exposure ends (global-shutter cameras); false waits'
          ' for every frame (rolling shutters, which still expose while the capture is answered)')
    move_timeout: float = param(30.0, 'time allowed for one z move [s]', minimum=0.1, maximum=600.0)
    frame_timeout: float = param(10.0, 'time allowed for a frame to arrive [s]', minimum=0.1, maximum=120.0)


@dataclass(frozen=True)
class TilerNodeParameters:
    """Parameters of the ``tiler_node`` node."""

    tile_size: int = param(0, 'detector tile size [px]; 0 passes whole frames on', minimum=0, maximum=8192)
    tile_overlap: int = param(64, 'overlap between neighbouring tiles [px]', minimum=0, maximum=4096)
    mosaic_resolution: float = param(10e-6, 'mosaic pixel size at the sample [m]', minimum=1e-7, maximum=1e-3)
    mosaic_every: int = param(25,
          'rewrite the mosaic every N frames (and at the end of a scan)',
          minimum=1, maximum=100000)
    mosaic_queue: int = param(64,
          'frames waiting for the mosaic worker before the oldest is skipped',
          minimum=1, maximum=10000)
    data_dir: str = param('',
          'where scans/<scan_id>/mosaic.png and frames/ are written; empty = $FLAKE_DATA_DIR or ./data')
    mosaic_blend_px: int = param(48,
          'width of the ramp over which overlapping frames are blended in the mosaic [frame pixels]; 0 pastes '
          'them edge to edge',
          minimum=0, maximum=4096)
    revisit_binning: int = param(2,
          'revisit captures go to the detector averaged over this many pixels square (50x binned 2 x 2 still '
          'resolves 2.5 times finer than the 10x scan, at a quarter of the detector\'s work); 1 = as captured',
          minimum=1, maximum=8)
    keep_frames: bool = param(True,
          'keep every scan frame at full resolution as scans/<scan_id>/frames/<tile>.jpg and announce it on '
          'registry/frames, so the registry records it')
    frame_jpeg_quality: int = param(92, 'JPEG quality of kept frames', minimum=50, maximum=100)
    frames_max_megabytes: float = param(4096.0,
          'disk the kept frames of all scans in the data folder may take; beyond it new frames are not kept '
          '(a warning and /diagnostics say so) [MB]',
          minimum=1.0, maximum=1e7)


@dataclass(frozen=True)
class ScanCoordinatorParameters:
    """Parameters of the ``scan_coordinator`` node."""

    objective: str = param('10x', 'objective used for scanning', choices=tuple(OBJECTIVES))
    revisit_objective: str = param('50x', 'objective for revisits of promising flakes', choices=tuple(OBJECTIVES))
    camera_node: str = param('camera_node', 'name of the camera node whose objective is switched and whose '
                             'pixel_pitch sets the pixel size at the sample')
    detector_node: str = param('detector_node', 'name of the detector node whose backend a goal\'s detector selects')
    overlap: float = param(0.1, 'default overlap between neighbouring fields', minimum=0.0, maximum=0.49)
    focus_strategy: str = param('focus_map', 'default focus strategy', choices=FOCUS_STRATEGIES)
    focus_points: int = param(3, 'points measured for a focus map (Greplova et al. 2020 use 3)', minimum=3, maximum=50)
    default_z: float = param(0.0,
          'stage z used with the "fixed" strategy before any focus was found [m]',
          minimum=-0.01, maximum=0.01)
    revisit_max: int = param(10, 'default number of flakes revisited after a scan', minimum=0, maximum=1000)
    move_timeout: float = param(30.0, 'time allowed for one stage move [s]', minimum=0.1, maximum=600.0)
    capture_timeout: float = param(10.0, 'time allowed for one frame to arrive [s]', minimum=0.1, maximum=120.0)
    autofocus_timeout: float = param(60.0, 'time allowed for one autofocus [s]', minimum=1.0, maximum=600.0)
    drain_timeout: float = param(300.0,
          'time allowed for detection to catch up after the last frame [s]',
          minimum=0.0, maximum=3600.0)
    registry_timeout: float = param(10.0,
          'time allowed for the registry to answer (wafer frames, revisit lists) [s]',
          minimum=0.1, maximum=600.0)
    hardware_speed: float = param(5e-3, 'stage speed of the hardware timing model [m/s]', minimum=1e-5, maximum=1.0)
    hardware_acceleration: float = param(0.1,
          'stage acceleration of the hardware timing model [m/s^2]',
          minimum=1e-4, maximum=10.0)
    hardware_settle: float = param(0.02, 'stage settle time of the hardware timing model [s]', minimum=0.0, maximum=5.0)
    hardware_z_speed: float = param(1e-3,
          'focus (z) speed of the hardware timing model [m/s]',
          minimum=1e-6, maximum=1.0)
    hardware_z_acceleration: float = param(50e-3,
          'focus (z) acceleration of the hardware timing model [m/s^2]',
          minimum=1e-5, maximum=10.0)
    hardware_exposure: float = param(0.01, 'exposure of the hardware timing model [s]', minimum=0.0, maximum=5.0)
    hardware_readout: float = param(0.033,
          'sensor readout and transfer per frame of the hardware timing model [s] (a 1 MP camera at 30 frames/s)',
          minimum=0.0, maximum=5.0)


@dataclass(frozen=True)
class BagRecorderParameters:
    """Parameters of the ``bag_recorder`` node."""

    output: str = param('', 'bag directory to create; empty: recording_<UTC date_time> in the working directory')
    topics: str = param('', 'topics to record, comma or space separated (absolute names)')
    all_topics: bool = param(False, 'record every topic of the graph (except exclude_topics)')
    exclude_topics: str = param('/rosout,/parameter_events', 'topics never recorded with all_topics')
    storage: str = param('mcap', 'storage plugin of the bag', choices=STORAGES)
    bag_version: int = param(9,
          'rosbag2 metadata version: 9 for Jazzy/Kilted, 8 for Iron',
          minimum=min(BAG_VERSIONS), maximum=max(BAG_VERSIONS))
    duration: float = param(0.0, 'stop after this many seconds [s]; 0 records until stopped', minimum=0.0, maximum=1e7)
    queue_size: int = param(2000,
          'messages waiting for the writer before new ones are dropped',
          minimum=1, maximum=1_000_000)
    discovery_period: float = param(0.2,
          'how often the graph is searched for the topics to record [s]',
          minimum=0.01, maximum=60.0)
    ground_truth: str = param('',
          'COCO ground-truth file stored with the bag: as ground_truth.json in its directory and as a '
          'std_msgs/String message on /scan/ground_truth')


@dataclass(frozen=True)
class BagReplayerParameters:
    """Parameters of the ``bag_replayer`` node."""

    bag: str = param('', 'bag to replay: a rosbag2 directory or a .mcap/.db3 file')
    rate: float = param(1.0,
          'playback speed factor; 0 = unlimited (as fast as subscribers acknowledge)',
          minimum=0.0, maximum=1000.0)
    start_offset: float = param(0.0, 'skip this much of the bag from its start [s]', minimum=0.0, maximum=1e7)
    loop: bool = param(False, 'start again from the beginning when the bag ends')
    topics: str = param('', 'topics to replay, comma or space separated; empty replays all')
    remap: str = param('', 'renamed topics, e.g. "/scan/tiles:=/old/tiles, /a:=/b"')
    publish_clock: bool = param(True, 'publish the bag time on /clock (for use_sim_time)')
    clock_topic: str = param('/clock', 'where the bag time is published')
    clock_frequency: float = param(40.0,
          'how often /clock is published while waiting for a message [Hz]',
          minimum=1.0, maximum=1000.0)
    queue_depth: int = param(100, 'publisher history depth', minimum=1, maximum=100_000)
    ack_window: int = param(50,
          'at most this many reliable messages in flight before waiting for acknowledgements; 0 never waits',
          minimum=0, maximum=100_000)
    ack_timeout: float = param(5.0, 'longest wait for acknowledgements [s]', minimum=0.01, maximum=600.0)
    wait_for_subscribers: int = param(0,
          'start only when every replayed topic has this many subscribers',
          minimum=0, maximum=1000)
    wait_timeout: float = param(30.0, 'longest wait for those subscribers [s]', minimum=0.0, maximum=3600.0)
    start_delay: float = param(0.2,
          'pause before the first message [s]: lets subscribers that were just discovered finish matching, or they '
          'miss the first messages',
          minimum=0.0, maximum=3600.0)
    start_paused: bool = param(False, 'wait for a call of ~/resume (std_srvs/Trigger) before playing')
    skip_unknown_types: bool = param(False,
          'leave out topics whose message type is unknown here (or was recorded with another definition) instead of'
          ' refusing the bag')


# Node name -> schema, for docs/parameters.md and the checks of config/*.yaml.
SCHEMAS = {
    'stage_node': StageNodeParameters,
    'camera_node': CameraNodeParameters,
    'autofocus_node': AutofocusNodeParameters,
    'scan_coordinator': ScanCoordinatorParameters,
    'tiler_node': TilerNodeParameters,
    'bag_recorder': BagRecorderParameters,
    'bag_replayer': BagReplayerParameters,
}
