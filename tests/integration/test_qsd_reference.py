"""Replay qemu-storage-daemon 7.2's recorded conversations against qmpd.

Every case in tests/data/qsd/*.json (written by tests/tools/record_qsd.py) is
one test: make the same images, start qmpd with the same daemon arguments,
send the same bytes, and compare the normalised replies with qsd's. Returns
and errors are compared in order; events are compared in order among
themselves (their interleaving with replies depends on thread timing).

Cases that cannot change daemon state (no images, no daemon arguments, no
successful state-changing command in the recording) share one qmpd per run;
the others each get a fresh one, as they did with qsd.

A case may carry a ``difference``: ``{"note": why, "skip": [parts]}`` where a
part is ``greeting``, ``negotiation``, ``steps[N]``, ``steps[N].replies`` or
``steps[N].events``; only those parts are left out of the comparison.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from tests.oracles import require
from tests.tools import qsd_transcript, record_qsd
from tests.tools.qsd_transcript import (Normaliser, compare, expand, needs_fresh_daemon, play,
                                        prepare, split_replies)

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "qsd"


def load_cases() -> list:
    params = []
    for path in sorted(DATA_DIR.glob("*.json")):
        doc = json.loads(path.read_text())
        for case in doc["cases"]:
            marks = [pytest.mark.interop] if case.get("images") else []
            params.append(pytest.param(case, id=f"{doc['group']}/{case['name']}", marks=marks))
    return params


CASES = load_cases()

#: Quiet time that ends the last step: replay waits for the recorded number
#: of replies and events first, so this only has to catch unexpected extras;
#: the other steps end sooner (an extra shows in the next step's messages).
REPLAY_SETTLE_SECONDS = 0.1
REPLAY_STEP_SETTLE_SECONDS = 0.02


@pytest.fixture(scope="module")
def image_cache() -> Iterator[str]:
    """Pristine images made once per run and copied into each case."""
    path = tempfile.mkdtemp(prefix="qsdimg-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("case", CASES)
def test_matches_qsd(case: dict, qmpd_daemon, shared_qmpd_daemon, image_cache) -> None:
    if case.get("images"):
        require("qemu-img")
    tmp = tempfile.mkdtemp(prefix="qsdref-")
    try:
        if needs_fresh_daemon(case):
            prepare(case, tmp, cache=image_cache)
            sock, _proc = qmpd_daemon(*[expand(a, tmp) for a in case.get("daemon_args", [])],
                                      workdir=tmp)
        else:
            sock = shared_qmpd_daemon()
        got = Normaliser(tmp).transcript(play(case, sock, tmp, settle=REPLAY_SETTLE_SECONDS,
                                          step_settle=REPLAY_STEP_SETTLE_SECONDS))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    problems = compare(case, got)
    assert not problems, f"{case['name']} differs from qsd 7.2:\n" + "\n".join(problems)


# --------------------------------------------------------------------------
# The recorder's own machinery: the comparison is only as good as these.


def test_every_group_is_recorded() -> None:
    recorded = {p.stem for p in DATA_DIR.glob("*.json")}
    assert recorded == set(record_qsd.GROUPS)


def test_recorded_cases_match_their_definitions() -> None:
    """The data was recorded from the cases the recorder defines today."""
    for group, build in record_qsd.GROUPS.items():
        doc = json.loads((DATA_DIR / f"{group}.json").read_text())
        recorded = {c["name"]: c for c in doc["cases"]}
        for case in build():
            spec = case.to_json()
            assert case.name in recorded, f"{group}/{case.name} not recorded"
            sends = [{k: v for k, v in s.items() if k in ("send", "send_b64", "until")}
                     for s in recorded[case.name]["steps"]]
            assert sends == [{k: v for k, v in s.items() if k != "responses"}
                             for s in spec["steps"]], f"{group}/{case.name} changed"


def test_normaliser_folds_volatile_values() -> None:
    norm = Normaliser("/tmp/qsdref-abc")
    msg = {"event": "JOB_STATUS_CHANGE", "timestamp": {"seconds": 5, "microseconds": 7},
           "data": {"desc": "Could not open '/tmp/qsdref-abc/a.img'",
                    "uuid": "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
                    "nodes": ["#block412", "#block97", "#block412"],
                    "slots": [{"iters": 123456, "active": True}], "actual-size": 4096,
                    "qemu": {"major": 7, "minor": 2, "micro": 22}, "package": "Debian"}}
    assert norm.value(msg) == {
        "event": "JOB_STATUS_CHANGE", "timestamp": {"seconds": 0, "microseconds": 0},
        "data": {"desc": "Could not open '{tmp}/a.img'", "uuid": "{uuid}",
                 "nodes": ["#block0", "#block1", "#block0"],
                 "slots": [{"iters": 0, "active": True}], "actual-size": 0,
                 "qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}}


def test_split_replies_keeps_each_stream_in_order() -> None:
    msgs = [{"event": "A"}, {"return": 1}, {"event": "B"}, {"error": {}}]
    assert split_replies(msgs) == ([{"return": 1}, {"error": {}}],
                                   [{"event": "A"}, {"event": "B"}])


def test_non_utf8_chunks_round_trip() -> None:
    step = qsd_transcript.S(b'{"id": "\xff"}').to_json()
    assert "send" not in step
    assert qsd_transcript.step_send_bytes(step) == b'{"id": "\xff"}'


def test_compare_reports_differences_and_honours_skips() -> None:
    case = {"name": "c", "greeting": {"QMP": {}}, "negotiate": "plain",
            "negotiation": [{"return": {}}],
            "steps": [{"send": "x", "replies": [{"return": 1}, {"event": "E"}]},
                      {"send": "y", "replies": [{"return": 2}]}]}
    same = {"greeting": {"QMP": {}}, "negotiation": [{"return": {}}],
            "steps": [{"replies": [{"return": 1}, {"event": "E"}]}, {"replies": [{"return": 2}]}]}
    assert compare(case, same) == []
    reordered = json.loads(json.dumps(same))
    reordered["steps"][0]["replies"].reverse()   # the reply before its job's events
    assert [p.split(":")[0] for p in compare(case, reordered)] == ["steps[0].order"]
    other = json.loads(json.dumps(same))
    other["steps"][1]["replies"] = [{"return": 3}]
    other["steps"][0]["replies"] = [{"return": 1}]
    problems = compare(case, other)
    assert [p.split(":")[0] for p in problems] == ["steps[0].events", "steps[0].order",
                                                   "steps[1].replies"]
    case["difference"] = {"note": "deliberate", "skip": ["steps[0].events", "steps[1]"]}
    assert compare(case, other) == []
