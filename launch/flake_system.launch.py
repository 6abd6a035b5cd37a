"""Bring up the flake scanner on a ROS 2 install: `ros2 launch launch/flake_system.launch.py`.

The nodes, parameter files and remappings come from flake_scanner.graph, the same
description `flake-system` uses on a pip-only install. Lifecycle (hardware) nodes
are configured at start and activated once they reach `inactive`.

Arguments: hardware:=sim|real  params_file:=FILE  namespace:=NS  use_sim_time:=true|false
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, EmitEvent, OpaqueFunction, RegisterEventHandler
from launch.events import matches_action
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from lifecycle_msgs.msg import Transition

from flake_scanner.graph import nodes_for, parameter_files


def _nodes(context):
    hardware = LaunchConfiguration('hardware').perform(context)
    params_file = LaunchConfiguration('params_file').perform(context) or None
    namespace = LaunchConfiguration('namespace').perform(context)
    use_sim_time = LaunchConfiguration('use_sim_time').perform(context).lower() == 'true'
    actions = []
    for spec in nodes_for(hardware):
        parameters = parameter_files(spec, hardware, params_file) + [{'use_sim_time': use_sim_time}]
        common = dict(package=spec.package, executable=spec.executable, name=spec.name,
                      namespace=namespace, parameters=parameters, remappings=list(spec.remappings),
                      output='screen')
        if not spec.lifecycle:
            actions.append(Node(**common))
            continue
        node = LifecycleNode(**common)
        actions += [
            node,
            RegisterEventHandler(OnStateTransition(
                target_lifecycle_node=node, goal_state='inactive',
                entities=[EmitEvent(event=ChangeState(
                    lifecycle_node_matcher=matches_action(node),
                    transition_id=Transition.TRANSITION_ACTIVATE))])),
            EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node),
                                        transition_id=Transition.TRANSITION_CONFIGURE)),
        ]
    return actions


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
