"""The job tables against QEMU 7.2's JobSTT and JobVerbTable, cell by cell.

The expected tables are written here the way job.c writes them (rows of
0/1 over U, C, R, P, Y, S, W, D, X, E, N), independently of the dicts in
qmpd.jobs.states, so a typo in either shows up as a failing cell.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, strategies as st

from qmpd.jobs import states
from qmpd.errors import QMPError

COLUMNS = ["undefined", "created", "running", "paused", "ready", "standby",
           "waiting", "pending", "aborting", "concluded", "null"]

#                 U  C  R  P  Y  S  W  D  X  E  N
QEMU_STT = {
    "undefined": [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    "created":   [0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1],
    "running":   [0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0],
    "paused":    [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    "ready":     [0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0],
    "standby":   [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
    "waiting":   [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0],
    "pending":   [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
    "aborting":  [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
    "concluded": [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    "null":      [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
}

# QEMU 7.2 (complete in standby since 6.0; no 'change' verb before 8.2).
#                 U  C  R  P  Y  S  W  D  X  E  N
QEMU_VERBS = {
    "cancel":    [0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "pause":     [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    "resume":    [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    "set-speed": [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    "complete":  [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0],
    "finalize":  [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
    "dismiss":   [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
}


def test_statuses_and_verbs_are_qapis_enums_in_order():
    assert list(states.STATUSES) == COLUMNS
    assert list(states.VERBS) == ["cancel", "pause", "resume", "set-speed",
                                  "complete", "dismiss", "finalize"]


@pytest.mark.parametrize("old", COLUMNS)
@pytest.mark.parametrize("new", COLUMNS)
def test_transition_table_matches_qemu(old, new):
    allowed = QEMU_STT[old][COLUMNS.index(new)] == 1
    if allowed:
        states.check_transition("j", old, new)
    else:
        with pytest.raises(AssertionError):
            states.check_transition("j", old, new)


@pytest.mark.parametrize("status", COLUMNS)
@pytest.mark.parametrize("verb", list(QEMU_VERBS))
def test_verb_table_matches_qemu(verb, status):
    allowed = QEMU_VERBS[verb][COLUMNS.index(status)] == 1
    if allowed:
        states.check_verb("job0", status, verb)
    else:
        with pytest.raises(QMPError) as info:
            states.check_verb("job0", status, verb)
        assert info.value.error_class == "GenericError"
        assert info.value.desc == (
            f"Job 'job0' in state '{status}' cannot accept command verb '{verb}'")


def test_completed_statuses_are_qemus_job_is_completed():
    assert states.COMPLETED == {"waiting", "pending", "aborting", "concluded", "null"}


# util/id.c: a letter, then letters, digits, '-', '.', '_' (ASCII only).
QEMU_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")


@pytest.mark.parametrize("job_id,ok", [
    ("j0", True), ("a", True), ("job-1.x_y", True), ("Z9", True),
    ("", False), ("0bad", False), ("-a", False), ("_a", False), ("a b", False),
    ("a/b", False), ("é", False), ("aé", False), ("a\u0661", False), ("a#", False),
])
def test_job_id_wellformed_examples(job_id, ok):
    assert states.job_id_wellformed(job_id) is ok


@given(st.text(max_size=12))
def test_job_id_wellformed_matches_qemus_rule(job_id):
    assert states.job_id_wellformed(job_id) is bool(QEMU_ID.match(job_id))


@given(st.from_regex(QEMU_ID, fullmatch=True))
def test_every_wellformed_id_is_accepted(job_id):
    assert states.job_id_wellformed(job_id)
