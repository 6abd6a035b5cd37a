"""The stage fault suite (small): replies jittering around the timeout, lost and duplicated,
and never a move reported done with the stage elsewhere. bench/bench_stage.py runs 2000+ moves."""

import pytest

from flake_scanner.stage.driver import StageDriver
from flake_scanner.stage.emulator import EmulatorConfig, StageEmulator
from flake_scanner.stage.fault_suite import run_fault_suite


def test_no_silent_wrong_position_with_jitter_lost_and_duplicated_replies():
    # A generous timeout keeps the machine's own load from dominating; jitter scales with it.
    result = run_fault_suite(moves=16, timeout=0.1, jitter=1.5, drop=0.05, duplicate=0.1, garbage=0.02, seed=5,
                             retries=4)
    assert result.moves == 16
    assert result.silent_wrong == 0, result
    assert result.correct + result.failed_loudly == 16
    # The faults really happened: replies missed the timeout, were lost and came twice.
    assert result.replies_late > 0 and result.replies_dropped > 0 and result.replies_duplicated > 0
    assert result.resyncs >= result.replies_late


def test_a_late_move_acknowledgement_is_waited_out_not_answered_by_a_resend():
    """The ":A" of a MOVE comes after the timeout: the driver drains it, asks the controller, and
    neither resends the move (it would queue behind) nor takes the late ":A" for a later command."""
    with StageEmulator(EmulatorConfig(time_scale=100.0, seed=2)) as emulator, \
            StageDriver(emulator.port, timeout=0.1, retries=2) as driver:
        for number, x in enumerate((0.001, -0.002, 0.0005), start=1):
            emulator.delay_next_replies(0.15)  # the MOVE's reply
            position = driver.move_to(x, 0.0, 0.0)
            assert position[0] == pytest.approx(x, abs=1e-7)
            assert emulator.position()[0] == pytest.approx(x, abs=1e-7)
            assert emulator.counters.moves == number  # one MOVE per move: nothing piled up
        assert driver.counters.lost_replies == 3 and driver.counters.moves_resent == 0
        assert driver.counters.faults == 0 and not driver.fault


def test_duplicated_acknowledgements_are_never_taken_for_positions():
    config = EmulatorConfig(time_scale=100.0, duplicate_probability=1.0, reply_jitter=0.02, seed=4)
    with StageEmulator(config) as emulator, StageDriver(emulator.port, timeout=0.2, retries=3) as driver:
        for x in (0.002, -0.001, 0.003):
            driver.move_to(x, 0.001, 0.0)
            assert emulator.position()[:2] == pytest.approx((x, 0.001), abs=1e-7)
        assert driver.where()[0] == pytest.approx(0.003, abs=1e-7)
        assert emulator.counters.replies_duplicated > 0


def test_a_move_that_cannot_be_confirmed_fails_loudly_and_says_so():
    config = EmulatorConfig(time_scale=100.0, seed=1)
    with StageEmulator(config) as emulator, StageDriver(emulator.port, timeout=0.1, retries=1) as driver:
        driver.move_to(0.001, 0.0, 0.0)
        emulator.hold_busy(0.0)
        emulator.drop_next_replies(100)
        with pytest.raises(Exception, match='no valid reply'):
            driver.move_to(0.002, 0.0, 0.0)
        assert driver.target == pytest.approx((0.002, 0.0, 0.0))
        assert driver.fault  # the position is not trusted until a move is confirmed
