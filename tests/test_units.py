"""flake_core.units: what people type is read in their units, what they read is shown in um, um^2, nm, local time."""

import time

import pytest

from flake_core.units import (
    AREA,
    LENGTH,
    THICKNESS,
    UnitError,
    length_label,
    local_time,
    nm,
    parse_point,
    parse_quantity,
    um,
    um2,
    with_uncertainty,
)


@pytest.mark.parametrize('text, kind, expected', [
    ('12.5', LENGTH, 12.5), ('1.2 mm', LENGTH, 1200.0), ('345nm', LENGTH, 0.345), ('0.01 µm', THICKNESS, 10.0),
    ('3 Å', THICKNESS, 0.3), ('300 um^2', AREA, 300.0), ('0.001 mm²', AREA, 1000.0), ('-4 um', LENGTH, -4.0),
    ('', LENGTH, None), ('   ', AREA, None), (None, THICKNESS, None)])
def test_a_typed_value_is_read_in_the_display_unit(text, kind, expected):
    value = parse_quantity(text, kind, 'field')
    assert value is None if expected is None else value == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize('text, kind, words', [
    ('3 kg', LENGTH, "--near: 'kg' in '3 kg' is not a unit of length; use µm or one of"),
    ('2 mm', AREA, "--near: 'mm' in '2 mm' is not a unit of area"),
    ('twelve', THICKNESS, "--near: 'twelve' is not a thickness; type a number in nm"),
    ('1e400', LENGTH, "--near: '1e400' is not a finite length"),
    ('1e305 m', LENGTH, "--near: '1e305 m' is not a finite length")])
def test_a_value_of_another_kind_is_refused_naming_the_input(text, kind, words):
    with pytest.raises(UnitError) as refused:
        parse_quantity(text, kind, '--near')
    assert refused.value.field == '--near' and str(refused.value).startswith(words)
    assert isinstance(refused.value, ValueError)


def test_a_point_is_two_lengths_each_with_its_own_unit():
    assert parse_point('1.2 mm, 400', 'near') == pytest.approx((1200.0, 400.0))
    assert parse_point('3;4 um', 'near') == pytest.approx((3.0, 4.0))
    assert parse_point('  ', 'near') is None
    with pytest.raises(UnitError, match='needs two lengths x, y'):
        parse_point('1, 2, 3', 'near')
    with pytest.raises(UnitError, match="'s' in '2 s' is not a unit of length"):
        parse_point('1 mm, 2 s', 'near')


def test_values_are_shown_in_people_units_and_nothing_for_no_value():
    assert (um(12.34e-6), um(12.34e-6, 3), um(None)) == ('12.3', '12.340', '')
    assert (um2(200.4e-12), um2(None)) == ('200', '')
    assert (nm(0.336e-9, 2), nm(None)) == ('0.34', '')


def test_an_uncertainty_is_shown_only_when_one_was_estimated():
    assert with_uncertainty(12.3, 0.4, 'nm') == '12.30 ± 0.40 nm'
    assert with_uncertainty(12.3, 0.001, 'nm') == '12.30 nm'         # rounds to 0: no "± 0.00"
    assert with_uncertainty(12.3, float('nan'), 'nm', digits=1) == '12.3 nm'
    assert with_uncertainty(1.0, 0.0, '') == '1.00'


def test_scale_bar_lengths_read_as_people_write_them():
    assert [length_label(v) for v in (5e-7, 1e-5, 2.5e-4, 1.5e-3)] == ['500 nm', '10 µm', '250 µm', '1.5 mm']


def test_local_time_carries_the_zone(monkeypatch):
    monkeypatch.setenv('TZ', 'UTC')
    time.tzset()
    try:
        assert local_time(1.7e9) == '2023-11-14 22:13:20 UTC'
        assert local_time(None) == local_time(0) == ''
    finally:
        monkeypatch.undo()
        time.tzset()
