"""Bring up one flake scanner: `ros2 launch flake_scanner flake_system.launch.py`.

The nodes, parameter files and remappings come from flake_scanner.graph, the same
description `flake-system` uses. Lifecycle (hardware) nodes are configured at start and
activated once they reach `inactive`. Several microscopes: launch/facility.launch.py.

Arguments: hardware:=sim|real  params_file:=FILE  namespace:=NS  use_sim_time:=true|false
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration

from flake_scanner.graph import single_graph
from flake_scanner.launching import node_actions


def _nodes(context):
    hardware = LaunchConfiguration('hardware').perform(context)
    params_file = LaunchConfiguration('params_file').perform(context) or None
    namespace = LaunchConfiguration('namespace').perform(context)
    use_sim_time = LaunchConfiguration('use_sim_time').perform(context).lower() == 'true'
    return node_actions(single_graph(hardware, namespace, params_file), use_sim_time)


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument('hardware', default_value='sim', choices=['sim', 'real'],
                              description='sim (simulated microscope) or real (config/hardware_real.yaml)'),
        DeclareLaunchArgument('params_file', default_value='',
                              description='YAML file overriding parameters of any node'),
        DeclareLaunchArgument('namespace', default_value='', description='namespace for every node'),
        DeclareLaunchArgument('use_sim_time', default_value='false',
                              description='follow /clock, e.g. when replaying a bag'),
        OpaqueFunction(function=_nodes),
    ])
