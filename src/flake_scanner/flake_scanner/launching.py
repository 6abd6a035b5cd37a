"""``ros2 launch`` actions for placed nodes (flake_scanner.graph), shared by the launch files.

Lifecycle (hardware) nodes are configured at start and activated once they reach
``inactive``, as a lifecycle manager would. Imported only by launch files: it needs
``launch`` and ``launch_ros`` (a ROS 2 install, or the ROS 2 tools kit in the venv).
"""

from __future__ import annotations

from flake_scanner.graph import Placement, parameter_files


def node_actions(placements: list[Placement], use_sim_time: bool) -> list:
    from launch.actions import EmitEvent, RegisterEventHandler
    from launch.events import matches_action
    from launch_ros.actions import LifecycleNode, Node
    from launch_ros.event_handlers import OnStateTransition
    from launch_ros.events.lifecycle import ChangeState
    from lifecycle_msgs.msg import Transition

    actions = []
    for placement in placements:
        spec = placement.spec
        parameters = parameter_files(spec, placement.hardware, placement.params_files) + [
            {'use_sim_time': use_sim_time}]
        common = dict(package=spec.package, executable=spec.executable, name=spec.name,
                      namespace=placement.namespace, parameters=parameters,
                      remappings=list(placement.remappings), output='screen')
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
