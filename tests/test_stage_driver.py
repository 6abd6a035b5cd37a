"""Stage protocol codec, and the pyserial driver against the emulator over a real pty."""

import os
import subprocess
import sys

import pytest
import serial

from flake_scanner.stage import protocol
from flake_scanner.stage.driver import (
    StageDriver,
    StageError,
    StageLimitError,
    StageNotHomedError,
    StageTimeoutError,
    TravelLimits,
)
from flake_scanner.stage.emulator import EmulatorConfig, StageEmulator, _AxisMove
from flake_scanner.stage.protocol import ControllerError, ProtocolError

# --- codec ----------------------------------------------------------------------------------


def test_move_encodes_tenths_of_micrometres_and_round_trips():
    line = protocol.encode_move(x=1.5e-3, y=-2.25e-6, z=1e-7)
    assert line == b'MOVE X=15000 Y=-22 Z=1\r'
    command = protocol.decode_command(line)
    assert command.verb == 'MOVE'
    assert command.args == {'X': 15000.0, 'Y': -22.0, 'Z': 1.0}
    assert protocol.to_metres(command.args['X']) == pytest.approx(1.5e-3)


def test_partial_move_names_only_given_axes():
    assert protocol.encode_move(z=-3e-6) == b'MOVE Z=-30\r'
    with pytest.raises(ValueError):
        protocol.encode_move()


def test_where_reply_round_trip_in_metres():
    reply = protocol.encode_reply_where([123456, -7, 0])
    assert reply == b':A 123456 -7 0\r\n'
    x, y, z = protocol.parse_where(reply)
    assert (x, y, z) == pytest.approx((0.0123456, -7e-7, 0.0))
    with pytest.raises(ProtocolError):
        protocol.parse_where(b':A 1 2\r\n', 3)


def test_status_ack_and_error_replies():
    assert protocol.parse_status(protocol.encode_reply_status(True)) is True
    assert protocol.parse_status(protocol.encode_reply_status(False)) is False
    protocol.parse_ack(protocol.encode_reply_ack())
    with pytest.raises(ControllerError) as info:
        protocol.parse_ack(protocol.encode_reply_error(4), 'MOVE X=1')
    assert info.value.code == 4 and 'out of range' in str(info.value)


@pytest.mark.parametrize('garbage', [b'\xff\x00:A\r\n', b'#:A 1 2 3\r\n', b'X\r\n', b':A 1 2 3\x07\r\n'])
def test_garbage_is_a_protocol_error(garbage):
    with pytest.raises(ProtocolError):
        protocol.parse_where(garbage, 3)


def test_controller_side_decoding_and_aliases():
    assert protocol.decode_command(b'W X Y\r') == protocol.Command('WHERE', {'X': None, 'Y': None})
    assert protocol.decode_command('/').verb == 'STATUS'
    with pytest.raises(ControllerError) as info:
        protocol.decode_command(b'MOVE Q=3\r')
    assert info.value.code == 2


def test_speed_is_sent_in_mm_per_s():
    assert protocol.encode_speed(2.5e-3, 1e-4) == b'SPEED X=2.5 Y=2.5 Z=0.1\r'


def test_here_sets_the_origin_and_aliases_follow_the_ms2000():
    assert protocol.encode_here(0.0, 0.0, 0.0) == b'HERE X=0 Y=0 Z=0\r'
    assert protocol.decode_command(b'! X Y\r').verb == 'HOME'
    assert protocol.decode_command(b'H X=0\r').verb == 'HERE'


def test_trapezoid_and_triangle_profiles_end_on_target():
    long_move = _AxisMove(0.0, 0.01, 0.0, speed=5e-3, accel=0.1)
    assert long_move.duration == pytest.approx(0.01 / 5e-3 + 5e-3 / 0.1)
    assert long_move.position(long_move.duration / 2) == pytest.approx(0.005)
    assert long_move.position(10.0) == 0.01
    short_move = _AxisMove(0.0, -1e-5, 0.0, speed=5e-3, accel=0.1)
    assert short_move.duration == pytest.approx(2 * (1e-5 / 0.1) ** 0.5)
    assert -1e-5 < short_move.position(short_move.duration / 4) < 0


# --- driver against the emulator over a pty ------------------------------------------------


@pytest.fixture
def emulator():
    emu = StageEmulator(EmulatorConfig(time_scale=50.0, seed=1))
    emu.start()
    yield emu
    emu.stop()


@pytest.fixture
def driver(emulator):
    # Generous reply timeout: the machine may be busy, and a spurious timeout would change the counts.
    drv = StageDriver(emulator.port, timeout=0.5, retries=3, reconnect_attempts=5, reconnect_delay=0.05)
    drv.open()
    yield drv
    drv.close()


def test_move_where_and_home(driver, emulator):
    driver.move_to(0.012, -0.0031, 2.5e-4)
    assert driver.is_busy() is False
    assert driver.where() == pytest.approx((0.012, -0.0031, 2.5e-4), abs=1e-7)
    assert emulator.position() == pytest.approx((0.012, -0.0031, 2.5e-4), abs=1e-7)
    driver.move_by(dx=-0.002, dz=-5e-5)
    assert driver.where() == pytest.approx((0.010, -0.0031, 2.0e-4), abs=1e-7)
    driver.home()
    assert driver.homed and driver.where() == pytest.approx((0, 0, 0), abs=1e-7)
    assert driver.counters.faults == 0 and driver.counters.retries == 0


def test_move_without_wait_reports_busy_then_arrives(driver, emulator):
    driver.set_speed(0.5e-3)
    driver.move_to(x=0.01, wait=False)  # 10 mm at 0.5 mm/s: 20 emulated s = 0.4 real s
    assert driver.is_busy() is True
    mid = driver.where()[0]
    assert 0.0 <= mid < 0.01
    driver.wait_until_idle(timeout=5.0)
    assert driver.where()[0] == pytest.approx(0.01, abs=1e-7)


def test_stop_halts_between_start_and_target(driver):
    driver.set_speed(0.5e-3)
    driver.move_to(x=0.02, wait=False)  # 0.8 real s of motion: stopped long before the end
    driver.stop()
    assert driver.is_busy() is False
    assert driver.where()[0] < 0.02


def test_lost_reply_is_retried(driver, emulator):
    emulator.drop_next_replies(2)
    assert driver.where() == pytest.approx((0, 0, 0))
    assert driver.counters.lost_replies == 2 and driver.counters.retries == 2
    assert emulator.counters.replies_dropped == 2


def test_lost_move_ack_is_retried_without_double_motion(driver, emulator):
    driver.move_to(0.001, 0.0, 0.0)
    emulator.drop_next_replies(1)
    driver.move_by(dx=0.001)  # the move runs, its ack is lost, the absolute move is resent
    assert driver.where()[0] == pytest.approx(0.002, abs=1e-7)
    assert driver.counters.lost_replies == 1


def test_garbage_bytes_trigger_resync_and_resend(driver, emulator):
    emulator.garble_next_replies(3)
    assert driver.where() == pytest.approx((0, 0, 0))
    assert driver.counters.resyncs == 3
    assert emulator.counters.garbage_sent == 3


def test_too_many_lost_replies_is_a_clear_error(emulator):
    emulator.drop_next_replies(10)
    with StageDriver(emulator.port, timeout=0.2, retries=2) as drv:
        with pytest.raises(StageError, match='no valid reply to .WHERE X Y Z. .* after 3 attempts'):
            drv.where()
        assert drv.counters.faults == 1
        assert 'no reply within' in drv.fault_message


def test_disconnect_is_followed_by_reconnect(driver, emulator):
    driver.move_to(0.003, 0.004, 0.0)
    emulator.disconnect(down_for=0.15)
    assert driver.where() == pytest.approx((0.003, 0.004, 0.0), abs=1e-7)
    assert driver.counters.reconnects == 1
    assert emulator.counters.disconnects == 1


def test_permanent_disconnect_ends_in_a_clear_error(driver, emulator):
    emulator.disconnect(down_for=None)
    with pytest.raises(StageError, match='lost the stage controller .* 5 reconnect attempts failed'):
        driver.where()
    assert driver.counters.faults >= 1


def test_out_of_limits_is_rejected_before_sending(driver, emulator):
    sent = emulator.counters.commands
    with pytest.raises(StageLimitError, match='x = 60.0000 mm is outside'):
        driver.move_to(0.06, 0.0)
    assert emulator.counters.commands == sent
    assert driver.where()[0] == 0.0


def test_controller_limit_refusal_is_a_limit_error(emulator):
    wide = TravelLimits(x=(-1.0, 1.0))
    with StageDriver(emulator.port, timeout=0.5, limits=wide) as drv:
        with pytest.raises(StageLimitError, match='controller refused'):
            drv.move_to(x=0.5)


def test_busy_controller_is_waited_for_or_times_out(driver, emulator):
    emulator.hold_busy(0.1)
    driver.wait_until_idle(timeout=5.0)
    assert driver.is_busy() is False
    emulator.hold_busy(5.0)
    with pytest.raises(StageTimeoutError):
        driver.wait_until_idle(timeout=0.05)


def test_homing_makes_the_home_position_the_origin():
    config = EmulatorConfig(time_scale=100.0, home_position=(0.01, -0.02, 0.001), initial_position=(0.0, 0.0, 0.0))
    with StageEmulator(config) as emu, StageDriver(emu.port, timeout=0.5) as drv:
        drv.move_to(0.002, 0.0, 0.0)
        drv.home()
        assert drv.homed and drv.where() == pytest.approx((0.0, 0.0, 0.0), abs=1e-7)
        drv.move_to(x=0.001)  # 1 mm from home, i.e. 11 mm on the mechanical scale
        assert emu.position() == pytest.approx((0.001, 0.0, 0.0), abs=1e-7)
        assert emu._moves['X'].target == pytest.approx(0.011)


def test_homing_required_when_configured(emulator):
    with StageDriver(emulator.port, timeout=0.5, require_homing=True) as drv:
        with pytest.raises(StageNotHomedError):
            drv.move_to(0.001)
        drv.home()
        drv.move_to(0.001)
        assert drv.where()[0] == pytest.approx(0.001)


def test_missing_port_is_a_clear_error(tmp_path):
    drv = StageDriver(str(tmp_path / 'ttyUSB9'))
    with pytest.raises(StageError, match='cannot open stage port'):
        drv.open()


def test_random_faults_over_many_commands_are_all_recovered():
    config = EmulatorConfig(time_scale=100.0, drop_probability=0.05, garbage_probability=0.05, seed=7)
    with StageEmulator(config) as emu, StageDriver(emu.port, timeout=0.2, retries=5) as drv:
        for i in range(40):
            drv.move_to(x=i * 1e-5, wait=False)
            assert -1e-7 <= drv.where()[0] <= i * 1e-5 + 1e-7
        drv.wait_until_idle(5.0)
        assert drv.where()[0] == pytest.approx(39e-5, abs=1e-7)
        assert drv.counters.faults == 0
        # Every injected fault was noticed and the line drained (a busy machine may add a spurious timeout).
        assert drv.counters.resyncs >= emu.counters.replies_dropped + emu.counters.garbage_sent > 0


def test_serial_port_is_real_pyserial(driver):
    assert isinstance(driver._serial, serial.Serial)


def test_emulator_cli_serves_a_port_until_terminated():
    process = subprocess.Popen([sys.executable, '-m', 'flake_scanner.stage.emulator', '--time-scale', '50'],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = process.stdout.readline().strip()
        with StageDriver(port, timeout=0.5) as drv:
            drv.move_to(0.001, 0.002, 0.0)
            assert drv.where() == pytest.approx((0.001, 0.002, 0.0), abs=1e-7)
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0
    assert 'served' in process.stderr.read()
    assert not os.path.lexists(port)
