"""Declared parameters: descriptors, start-up validation and refused runtime changes."""

from dataclasses import FrozenInstanceError, dataclass

import pytest
from rclpy.parameter import Parameter

from flake_core.node_tools import declare_parameters
from flake_core.parameters import param

pytestmark = pytest.mark.ros


@dataclass(frozen=True)
class Spec:
    speed: float = param(2e-3, 'stage speed [m/s]', minimum=1e-5, maximum=0.05)
    objective: str = param('10x', 'objective name', choices=('5x', '10x', '20x'))
    retries: int = param(3, 'serial retries', minimum=0, maximum=10)


def test_declared_parameters_carry_descriptors_and_refuse_invalid_changes(ros):
    node = ros.create_node('params_test')
    try:
        seen = []
        node.params = declare_parameters(node, Spec, on_change=seen.append)
        assert node.params == Spec(speed=2e-3, objective='10x', retries=3)
        with pytest.raises(FrozenInstanceError):
            node.params.retries = 4
        descriptor = node.describe_parameter('speed')
        assert 'stage speed' in descriptor.description
        assert descriptor.floating_point_range[0].to_value == pytest.approx(0.05)
        assert node.describe_parameter('retries').integer_range[0].to_value == 10
        refused = node.set_parameters([Parameter('speed', value=1.0)])[0]
        assert not refused.successful and 'speed' in refused.reason
        refused = node.set_parameters([Parameter('objective', value='63x')])[0]
        assert not refused.successful and 'one of' in refused.reason
        accepted = node.set_parameters([Parameter('retries', value=5)])[0]
        assert accepted.successful
        assert node.params.retries == 5 and seen == [{'retries': 5}]
    finally:
        node.destroy_node()


def test_invalid_start_up_value_fails_loudly(ros):
    node = ros.create_node('params_test_bad', parameter_overrides=[Parameter('retries', value=-1)])
    try:
        with pytest.raises(Exception, match='retries'):
            declare_parameters(node, Spec)
    finally:
        node.destroy_node()


def test_diagnostic_status_accepts_the_message_levels_and_plain_integers():
    from diagnostic_msgs.msg import DiagnosticStatus

    from flake_core.node_tools import ERROR, OK, diagnostic_status

    assert diagnostic_status('a', 'hw', OK, 'fine').level == DiagnosticStatus.OK
    status = diagnostic_status('a', 'hw', 2, 'broken', {'retries': 3})
    assert status.level == ERROR and status.values[0].key == 'retries' and status.values[0].value == '3'
