"""Bring up a facility: several microscopes feeding one registry.

`ros2 launch flake_scanner facility.launch.py microscopes:=scope1,scope2:real:lab2.yaml`

Each microscope is one entry NAME[:HARDWARE[:PARAMS_FILE]] of `microscopes`: its stage,
camera, autofocus, scan coordinator, tiler and detector run in the namespace /NAME with its
own parameter file; the registry and the defect analyzer run once at the root, and every
microscope's detections and wafer frames go to that registry (flake_scanner.graph).
`flake-system --microscope scope1 --microscope scope2` is the same without ros2 launch.

Arguments: microscopes:=LIST  params_file:=FILE (every node)  use_sim_time:=true|false
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration

from flake_scanner.graph import Microscope, facility_graph
from flake_scanner.launching import node_actions


def _nodes(context):
    entries = [e for e in LaunchConfiguration('microscopes').perform(context).split(',') if e.strip()]
    microscopes = [Microscope.parse(entry) for entry in entries]
    params_file = LaunchConfiguration('params_file').perform(context) or None
    use_sim_time = LaunchConfiguration('use_sim_time').perform(context).lower() == 'true'
    return node_actions(facility_graph(microscopes, params_file), use_sim_time)


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument('microscopes', default_value='scope1,scope2',
                              description='comma-separated NAME[:sim|real[:PARAMS_FILE]], one per microscope'),
        DeclareLaunchArgument('params_file', default_value='',
                              description='YAML file overriding parameters of any node (/NAME/** for one microscope)'),
        DeclareLaunchArgument('use_sim_time', default_value='false',
                              description='follow /clock, e.g. when replaying a bag'),
        OpaqueFunction(function=_nodes),
    ])
