"""Record qemu-storage-daemon 7.2's answers to QMP conversations.

The cases are described and played by tests/tools/qsd_transcript.py (its
theory of operation) and built in tests/tools/qsd_cases_*.py, one module per
group or two; this module records them and checks the recordings.

Run: ``.venv/bin/python -m tests.tools.record_qsd [--group NAME ...]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

from tests.tools import qsd_cases_exports
from tests.tools.qsd_cases_block import block_cases, secret_cases
from tests.tools.qsd_cases_block_io import block_io_cases
from tests.tools.qsd_cases_ciphers import cipher_cases
from tests.tools.qsd_cases_protocol import (envelope_cases, greeting_cases, parse_cases,
                                            validation_cases)
from tests.tools.qsd_transcript import DATA_DIR, Case, compare, play_qsd, record_case

GROUPS: dict[str, Callable[[], list[Case]]] = {
    "greeting": greeting_cases,
    "envelope": envelope_cases,
    "parse": parse_cases,
    "validation": validation_cases,
    "secrets": secret_cases,
    "block": block_cases,
    "exports": lambda: qsd_cases_exports.exports_cases(),
    "block-io": block_io_cases,
    "ciphers": cipher_cases,
}


def qsd_version() -> str:
    out = subprocess.run(["qemu-storage-daemon", "--version"], capture_output=True, text=True)
    return out.stdout.splitlines()[0].strip()


def load_group(group: str) -> dict:
    path = DATA_DIR / f"{group}.json"
    return json.loads(path.read_text()) if path.exists() else {"cases": []}


def record_group(group: str, only: set[str] | None = None) -> Path:
    cases = GROUPS[group]()
    old = {c["name"]: c for c in load_group(group)["cases"]}
    names = [c.name for c in cases]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise SystemExit(f"duplicate case names in {group}: {sorted(dup)}")
    out = []
    for case in cases:
        if only and case.name not in only and case.name in old:
            out.append(old[case.name])
            continue
        print(f"{group}/{case.name}", file=sys.stderr, flush=True)
        out.append(record_case(case))
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    path = DATA_DIR / f"{group}.json"
    doc = {"group": group, "recorded_with": qsd_version(),
           "note": "written by tests/tools/record_qsd.py; replayed by "
                   "tests/integration/test_qsd_reference.py",
           "cases": out}
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    return path


def check_group(group: str, only: set[str] | None = None) -> int:
    """Replay the recorded cases against qsd again: is the recording stable?"""
    bad = 0
    for case in load_group(group)["cases"]:
        if only and case["name"] not in only:
            continue
        problems = compare(case, play_qsd(case))
        if problems:
            bad += 1
            print(f"UNSTABLE {group}/{case['name']}:\n" + "\n".join(problems), flush=True)
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", action="append", choices=sorted(GROUPS),
                        help="record only this group (repeatable)")
    parser.add_argument("--case", action="append",
                        help="re-record only this case, keep the others (repeatable)")
    parser.add_argument("--check", action="store_true",
                        help="do not record: replay the recorded cases against qsd "
                             "and report the ones whose answers changed")
    ns = parser.parse_args(argv)
    only = set(ns.case) if ns.case else None
    if ns.check:
        return 1 if sum(check_group(g, only) for g in ns.group or list(GROUPS)) else 0
    for group in ns.group or list(GROUPS):
        print(record_group(group, only))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
