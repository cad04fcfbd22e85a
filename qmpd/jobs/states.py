"""The job state machine as data: statuses, transitions, and accepted verbs.

These tables restate QEMU 7.2's ``JobSTT`` and ``JobVerbTable`` (job.c) so
that a client sees the same statuses and the same refusals as from
qemu-storage-daemon. The code that moves a job between statuses lives in
:mod:`qmpd.jobs.manager`; it asks these tables first and never decides on
its own what is legal.

An illegal *transition* is a bug in the daemon (QEMU asserts), so
:func:`check_transition` raises ``AssertionError``. An illegal *verb* is a
client's mistake and becomes QEMU's GenericError text.
"""

from __future__ import annotations

from qmpd.errors import GENERIC_ERROR, QMPError

# Statuses, in QAPI's JobStatus order (query-qmp-schema lists them so).
UNDEFINED = "undefined"
CREATED = "created"
RUNNING = "running"
PAUSED = "paused"
READY = "ready"
STANDBY = "standby"
WAITING = "waiting"
PENDING = "pending"
ABORTING = "aborting"
CONCLUDED = "concluded"
NULL = "null"

STATUSES: tuple[str, ...] = (
    UNDEFINED,
    CREATED,
    RUNNING,
    PAUSED,
    READY,
    STANDBY,
    WAITING,
    PENDING,
    ABORTING,
    CONCLUDED,
    NULL,
)

# Verbs, in QEMU 7.2's JobVerb order ('change' arrived only in 8.2).
CANCEL = "cancel"
PAUSE = "pause"
RESUME = "resume"
SET_SPEED = "set-speed"
COMPLETE = "complete"
DISMISS = "dismiss"
FINALIZE = "finalize"

VERBS: tuple[str, ...] = (CANCEL, PAUSE, RESUME, SET_SPEED, COMPLETE, DISMISS, FINALIZE)

#: Job types of QEMU 7.2's JobType enum; qmpd runs only 'create' and 'amend'.
JOB_TYPES: tuple[str, ...] = (
    "commit",
    "stream",
    "mirror",
    "backup",
    "create",
    "amend",
    "snapshot-load",
    "snapshot-save",
    "snapshot-delete",
)

#: status -> the statuses it may move to.
TRANSITIONS: dict[str, frozenset[str]] = {
    UNDEFINED: frozenset({CREATED}),
    CREATED: frozenset({RUNNING, ABORTING, NULL}),
    RUNNING: frozenset({PAUSED, READY, WAITING, ABORTING}),
    PAUSED: frozenset({RUNNING}),
    READY: frozenset({STANDBY, WAITING, ABORTING}),
    STANDBY: frozenset({READY}),
    WAITING: frozenset({PENDING, ABORTING}),
    PENDING: frozenset({ABORTING, CONCLUDED}),
    ABORTING: frozenset({ABORTING, CONCLUDED}),
    CONCLUDED: frozenset({NULL}),
    NULL: frozenset(),
}

#: verb -> the statuses in which a client may apply it.
_ACTIVE = frozenset({CREATED, RUNNING, PAUSED, READY, STANDBY})
VERB_ACCEPTED_IN: dict[str, frozenset[str]] = {
    CANCEL: _ACTIVE | {WAITING, PENDING},
    PAUSE: _ACTIVE,
    RESUME: _ACTIVE,
    SET_SPEED: _ACTIVE,
    COMPLETE: frozenset({READY, STANDBY}),
    DISMISS: frozenset({CONCLUDED}),
    FINALIZE: frozenset({PENDING}),
}

#: Statuses in which the job's own work is over (QEMU's job_is_completed).
COMPLETED = frozenset({WAITING, PENDING, ABORTING, CONCLUDED, NULL})


def check_transition(job_id: str, old: str, new: str) -> None:
    """Refuse a transition the table does not allow: that is a daemon bug."""
    assert new in TRANSITIONS[old], f"job '{job_id}': illegal transition {old} -> {new}"


def check_verb(job_id: str, status: str, verb: str) -> None:
    """Raise QEMU's GenericError if a job in ``status`` refuses ``verb``."""
    if status not in VERB_ACCEPTED_IN[verb]:
        raise QMPError(
            GENERIC_ERROR,
            f"Job '{job_id}' in state '{status}' cannot accept command verb '{verb}'",
        )


def job_id_wellformed(job_id: str) -> bool:
    """QEMU's id_wellformed: an ASCII letter, then letters, digits, '-', '.', '_'."""
    if not job_id or not _is_ascii_alpha(job_id[0]):
        return False
    return all(_is_ascii_alpha(c) or c.isascii() and c.isdigit() or c in "-._" for c in job_id[1:])


def _is_ascii_alpha(c: str) -> bool:
    return c.isascii() and c.isalpha()
