"""The one description of the node graph: which nodes run, where, with which parameter
files and remappings: one microscope (``single_graph``) or a facility of several
(``facility_graph``). ``launch/flake_system.launch.py`` and ``launch/facility.launch.py``
(``ros2 launch``) and ``flake-system`` (its own processes) all read it.

Pure core: no rclpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import os
from pathlib import Path
import re

HARDWARE_MODES = ('sim', 'real')


@dataclass(frozen=True)
class NodeSpec:
    package: str
    executable: str
    name: str
    remappings: tuple[tuple[str, str], ...] = ()
    lifecycle: bool = False  # hardware nodes start unconfigured and are brought up to active
    modes: tuple[str, ...] = HARDWARE_MODES
    extra_params: dict = field(default_factory=dict)
    # What the node offers once it is up (relative names): 'service:NAME', 'action:NAME' or
    # 'subscription:NAME'. A bring-up waits for all of them, and for the node to answer.
    ready: tuple[str, ...] = ()

    @property
    def config_file(self) -> str:
        return f'{self.name}.yaml'


GRAPH: tuple[NodeSpec, ...] = (
    NodeSpec('flake_scanner', 'stage_node', 'stage_node', lifecycle=True, ready=('service:stage/move',)),
    NodeSpec('flake_scanner', 'camera_node', 'camera_node', lifecycle=True, ready=('service:camera/capture',)),
    NodeSpec('flake_scanner', 'autofocus_node', 'autofocus_node', ready=('action:autofocus',)),
    NodeSpec('flake_scanner', 'scan_coordinator', 'scan_coordinator',
             ready=('action:scan', 'service:scan/set_wafer_frame')),
    NodeSpec('flake_scanner', 'tiler_node', 'tiler_node', ready=('subscription:scan/frames',)),
    NodeSpec('flake_detector', 'detector_node', 'detector_node', ready=('subscription:scan/tiles',)),
    NodeSpec('flake_registry', 'registry_node', 'registry_node',
             ready=('service:registry/query_flakes', 'service:registry/save_wafer_frame')),
    NodeSpec('flake_detector', 'defect_analyzer_node', 'defect_analyzer_node', ready=('service:defects/analyze',)),
)

# A facility: several microscopes, each under its own namespace with these nodes, and one of
# each shared node (the registry, the STEM defect analyzer) at the root.
MICROSCOPE_NODES = ('stage_node', 'camera_node', 'autofocus_node', 'scan_coordinator', 'tiler_node', 'detector_node')
# Names a microscope's nodes share with the whole facility: the registry's services, the
# detections every microscope feeds it and the frames its tiler keeps.
SHARED_NAMES = ('registry/get_revisit_list', 'registry/add_flake_image', 'registry/save_wafer_frame',
                'registry/get_wafer_frames', 'registry/frames', 'detections')
_NAME = re.compile(r'^[A-Za-z][A-Za-z0-9_]*$')


@dataclass(frozen=True)
class Microscope:
    """One microscope of a facility: its namespace, hardware and own parameter file."""

    name: str
    hardware: str = 'sim'
    params_file: str | None = None

    @classmethod
    def parse(cls, text: str) -> Microscope:
        """``NAME[:HARDWARE[:PARAMS_FILE]]``, e.g. ``scope1``, ``scope2:real:lab2.yaml``."""
        parts = text.strip().split(':', 2)
        name = parts[0]
        if not _NAME.match(name):
            raise ValueError(f'microscope name {name!r} must be a ROS name: a letter, then letters, digits or _')
        hardware = parts[1] if len(parts) > 1 and parts[1] else 'sim'
        if hardware not in HARDWARE_MODES:
            raise ValueError(f'microscope {name}: hardware must be one of {HARDWARE_MODES}, got {hardware!r}')
        params_file = parts[2] if len(parts) > 2 and parts[2] else None
        if params_file and not Path(params_file).exists():
            raise FileNotFoundError(f'microscope {name}: params file {params_file} does not exist')
        return cls(name, hardware, params_file)


@dataclass(frozen=True)
class Placement:
    """One node process of a bring-up: which node, where, with which files and remappings."""

    spec: NodeSpec
    namespace: str = ''  # '' or '/name'
    hardware: str = 'sim'
    params_files: tuple[str, ...] = ()
    remappings: tuple[tuple[str, str], ...] = ()
    in_facility: bool = False

    @property
    def key(self) -> str:
        """A unique label: the node name, with its namespace in a facility (``scope1/stage_node``)."""
        if not self.in_facility:
            return self.spec.name
        return f'{self.namespace.strip("/")}/{self.spec.name}'.lstrip('/')

    @property
    def full_name(self) -> str:
        return f'{self.namespace}/{self.spec.name}'

    def resolve(self, name: str) -> str:
        """The absolute name a relative ``name`` of this node ends up as (namespace, then remappings)."""
        for source, target in self.remappings:
            if source == name:
                return target if target.startswith('/') else f'{self.namespace}/{target}'
        return name if name.startswith('/') else f'{self.namespace}/{name}'


def _namespace(namespace: str) -> str:
    namespace = namespace.strip().strip('/')
    return f'/{namespace}' if namespace else ''


def single_graph(hardware: str = 'sim', namespace: str = '', params_file: str | None = None,
                 only: set[str] | None = None) -> list[Placement]:
    """The graph of one microscope (every node in ``namespace``)."""
    files = (params_file,) if params_file else ()
    return [Placement(spec, _namespace(namespace), hardware, files, spec.remappings)
            for spec in nodes_for(hardware, only)]


def facility_graph(microscopes: list[Microscope], params_file: str | None = None,
                   only: set[str] | None = None) -> list[Placement]:
    """Shared nodes at the root, then each microscope's nodes in its namespace, feeding them
    (``only``: node names to keep, in every microscope)."""
    names = [m.name for m in microscopes]
    if not microscopes:
        raise ValueError('a facility needs at least one microscope')
    if len(set(names)) != len(names):
        raise ValueError(f'microscope names must differ, got {names}')
    files = (params_file,) if params_file else ()
    placements = [Placement(spec, '', 'sim', files, spec.remappings, in_facility=True)
                  for spec in GRAPH if spec.name not in MICROSCOPE_NODES and (only is None or spec.name in only)]
    shared = tuple((name, f'/{name}') for name in SHARED_NAMES)
    for microscope in microscopes:
        own = files + ((microscope.params_file,) if microscope.params_file else ())
        for spec in nodes_for(microscope.hardware, set(MICROSCOPE_NODES) & (only or set(MICROSCOPE_NODES))):
            placements.append(Placement(spec, f'/{microscope.name}', microscope.hardware, own,
                                        spec.remappings + shared, in_facility=True))
    return placements


def config_dir() -> Path:
    """config/ of the checkout, or the installed share directory on a ROS 2 install."""
    override = os.environ.get('FLAKE_CONFIG_DIR')
    if override:
        return Path(override)
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / 'config'
        if (candidate / 'fastdds_profile.xml').exists():
            return candidate
    from ament_index_python.packages import get_package_share_directory

    return Path(get_package_share_directory('flake_scanner')) / 'config'


def nodes_for(hardware: str, only: set[str] | None = None) -> list[NodeSpec]:
    if hardware not in HARDWARE_MODES:
        raise ValueError(f'hardware must be one of {HARDWARE_MODES}, got {hardware!r}')
    return [n for n in GRAPH if hardware in n.modes and (only is None or n.name in only)]


def parameter_files(spec: NodeSpec, hardware: str, params_file: str | tuple[str, ...] | None = None,
                    directory: Path | None = None) -> list[str]:
    """Parameter files for a node, later ones overriding earlier ones.

    config/<node>.yaml holds the defaults (simulated hardware); config/hardware_real.yaml
    switches the drivers to real devices; the user's params files (a facility's, then a
    microscope's own) override both.
    """
    directory = directory or config_dir()
    files = []
    base = directory / spec.config_file
    if base.exists():
        files.append(str(base))
    if hardware == 'real':
        real = directory / 'hardware_real.yaml'
        if real.exists():
            files.append(str(real))
    for user_file in ((params_file,) if isinstance(params_file, str) else (params_file or ())):
        if not Path(user_file).exists():
            raise FileNotFoundError(f'params_file {user_file} does not exist')
        files.append(str(user_file))
    return files


def command_line(placement: Placement, use_sim_time: bool = False, executable_dir: str | None = None) -> list[str]:
    """The command that runs one placed node as its own process (the pip-only bring-up)."""
    spec = placement.spec
    exe = spec.executable if executable_dir is None else str(Path(executable_dir) / spec.executable)
    args = [exe, '--ros-args', '-r', f'__node:={spec.name}']
    if placement.namespace:
        args += ['-r', f'__ns:={placement.namespace}']
    for path in parameter_files(spec, placement.hardware, placement.params_files):
        args += ['--params-file', path]
    args += ['-p', f'use_sim_time:={"true" if use_sim_time else "false"}']
    for key, value in spec.extra_params.items():
        args += ['-p', f'{key}:={value}']
    for source, target in placement.remappings:
        args += ['-r', f'{source}:={target}']
    return args
