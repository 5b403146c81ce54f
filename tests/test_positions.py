"""Position specs and pyreft's caps on short prompts."""

import pytest

from server.reft.positions import PositionSpec, first_last_positions, intervention_positions, parse_positions


@pytest.mark.parametrize(
    "text, spec",
    [
        ("f7+l7", PositionSpec(7, 7)),
        ("f5", PositionSpec(5, 0)),
        ("l1", PositionSpec(0, 1)),
        ("F2+L3", PositionSpec(2, 3)),
        ("0,1,-1", PositionSpec(explicit=(0, 1, -1))),
        ("3, 3, 4", PositionSpec(explicit=(3, 4))),
    ],
)
def test_parse(text, spec):
    assert parse_positions(text) == spec
    assert parse_positions(str(spec)) == spec


@pytest.mark.parametrize("text", ["", "f", "x3", "f2+", "+l2", "l2+f2", "f0", "f0+l0", "f1+l1+l2", "1,,2", "f99999"])
def test_parse_rejects(text):
    with pytest.raises(ValueError):
        parse_positions(text)


@pytest.mark.parametrize(
    "length, first, last",
    [
        (1, [], []),  # L // 2 == 0: a one-token prompt gets no edit
        (2, [0], [1]),
        (3, [0], [2]),
        (4, [0, 1], [2, 3]),
        (5, [0, 1], [3, 4]),
        (20, [0, 1, 2], [17, 18, 19]),
    ],
)
def test_caps_on_short_prompts(length, first, last):
    assert first_last_positions(PositionSpec(3, 3), length) == (first, last)


def test_shared_weights_cover_both_sides_with_one_intervention():
    assert intervention_positions(PositionSpec(2, 2), True, 10) == [[0, 1, 8, 9]]
    assert intervention_positions(PositionSpec(2, 2), True, 3) == [[0, 2]]
    assert intervention_positions(PositionSpec(2, 2), True, 1) == [[]]


def test_unshared_weights_split_first_and_last():
    assert intervention_positions(PositionSpec(2, 3), False, 10) == [[0, 1], [7, 8, 9]]
    assert intervention_positions(PositionSpec(2, 3), False, 2) == [[0], [1]]
    assert intervention_positions(PositionSpec(2, 3), False, 1) == [[], []]


def test_unshared_one_sided_gives_every_intervention_all_positions():
    """pyreft: when one side is empty, every intervention gets the whole position list."""
    assert intervention_positions(PositionSpec(0, 2), False, 10) == [[8, 9], [8, 9]]


def test_explicit_positions_resolve_negatives_and_drop_out_of_range():
    spec = parse_positions("0,5,-1,-20")
    assert intervention_positions(spec, True, 4) == [[0, 3]]
    assert intervention_positions(spec, True, 10) == [[0, 5, 9]]
