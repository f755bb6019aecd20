"""The admission rule ``accepted + running < (v + eta + 1) * B`` with worked examples."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentrl.controller.admission import admissible_groups, capacity, may_admit


def test_capacity_is_v_plus_eta_plus_one_batches() -> None:
    assert capacity(0, 0, 4) == 4
    assert capacity(3, 2, 8) == 48


@pytest.mark.parametrize(
    ("accepted", "running", "version", "eta", "expected"),
    [
        (0, 3, 0, 0, True),  # sync: the 4th task of step 0 is admitted (3 < 4)
        (0, 4, 0, 0, False),  # sync: a full batch is running, wait for the learner
        (4, 0, 0, 0, False),  # sync: batch finished, still waits for v = 1
        (4, 0, 1, 0, True),  # sync: v = 1 opens the next batch
        (4, 3, 0, 1, True),  # eta = 1: one batch ahead, 7 < 8
        (4, 4, 0, 1, False),
    ],
)
def test_may_admit_worked_examples(accepted: int, running: int, version: int, eta: int, expected: bool) -> None:
    assert may_admit(accepted, running, version, eta, batch_size=4) is expected


def test_docstring_table() -> None:
    # B = 4, n = 2, eta = 1 (the table in agentrl.controller.admission)
    assert admissible_groups(0, 0, 0, 1, 4, 2) == 4
    assert admissible_groups(3, 5, 0, 1, 4, 2) == 0
    assert admissible_groups(5, 3, 1, 1, 4, 2) == 2


def test_whole_groups_only() -> None:
    # room for 3 tasks but groups of 2: one group, never half of one
    assert admissible_groups(0, 5, 0, 0, 8, 2) == 1
    assert admissible_groups(0, 7, 0, 0, 8, 2) == 0


def test_in_flight_cap_limits_running_only() -> None:
    # APRIL: B = 4, alpha = 0.5 -> 6 in flight; eta = 4 would allow 20
    assert admissible_groups(0, 0, 0, 4, 4, 1, max_in_flight=6) == 6
    assert admissible_groups(8, 6, 2, 4, 4, 1, max_in_flight=6) == 0
    assert admissible_groups(8, 2, 2, 4, 4, 1, max_in_flight=6) == 4


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        capacity(0, 0, 0)
    with pytest.raises(ValueError, match="group_size"):
        admissible_groups(0, 0, 0, 0, 4, 0)


@given(
    accepted=st.integers(0, 500), running=st.integers(0, 500), version=st.integers(0, 50),
    eta=st.integers(0, 8), b_groups=st.integers(1, 8), n=st.integers(1, 8),
)
def test_admitting_k_groups_keeps_the_rule(accepted: int, running: int, version: int, eta: int, b_groups: int,
                                           n: int) -> None:
    batch = b_groups * n
    k = admissible_groups(accepted, running, version, eta, batch, n)
    # every task of the k groups passes the rule when admitted one by one ...
    for i in range(k * n):
        assert may_admit(accepted, running + i, version, eta, batch)
    # ... and one more group would not
    assert not all(may_admit(accepted, running + k * n + i, version, eta, batch) for i in range(n))
