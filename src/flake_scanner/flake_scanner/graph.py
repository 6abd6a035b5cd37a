"""The one description of the node graph: which nodes run, with which parameter
files and remappings. ``launch/flake_system.launch.py`` (for ``ros2 launch`` on a
ROS 2 install) and ``flake-system`` (for the pip-only install) both read it.

Pure core: no rclpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import os
from pathlib import Path

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

    @property
    def config_file(self) -> str:
        return f'{self.name}.yaml'


GRAPH: tuple[NodeSpec, ...] = (
    NodeSpec('flake_scanner', 'stage_node', 'stage_node', lifecycle=True),
    NodeSpec('flake_scanner', 'camera_node', 'camera_node', lifecycle=True),
    NodeSpec('flake_scanner', 'autofocus_node', 'autofocus_node'),
    NodeSpec('flake_scanner', 'scan_coordinator', 'scan_coordinator'),
    NodeSpec('flake_scanner', 'tiler_node', 'tiler_node'),
    NodeSpec('flake_detector', 'detector_node', 'detector_node'),
    NodeSpec('flake_registry', 'registry_node', 'registry_node'),
    NodeSpec('flake_detector', 'defect_analyzer_node', 'defect_analyzer_node'),
)


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


def parameter_files(spec: NodeSpec, hardware: str, params_file: str | None = None,
                    directory: Path | None = None) -> list[str]:
    """Parameter files for a node, later ones overriding earlier ones.

    config/<node>.yaml holds the defaults (simulated hardware); config/hardware_real.yaml
    switches the drivers to real devices; a user's params_file overrides both.
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
    if params_file:
        if not Path(params_file).exists():
            raise FileNotFoundError(f'params_file {params_file} does not exist')
        files.append(str(params_file))
    return files


def command_line(spec: NodeSpec, hardware: str, namespace: str = '', params_file: str | None = None,
                 use_sim_time: bool = False, executable_dir: str | None = None) -> list[str]:
    """The command that runs ``spec`` as its own process (the pip-only bring-up)."""
    exe = spec.executable if executable_dir is None else str(Path(executable_dir) / spec.executable)
    args = [exe, '--ros-args', '-r', f'__node:={spec.name}']
    if namespace:
        args += ['-r', f'__ns:={namespace if namespace.startswith("/") else "/" + namespace}']
    for path in parameter_files(spec, hardware, params_file):
        args += ['--params-file', path]
    args += ['-p', f'use_sim_time:={"true" if use_sim_time else "false"}']
    for key, value in spec.extra_params.items():
        args += ['-p', f'{key}:={value}']
    for source, target in spec.remappings:
        args += ['-r', f'{source}:={target}']
    return args
