"""Print a recording of record_qsd_nbd.py in readable form.

    .venv/bin/python -m tests.nbd.show_recording [SCENARIO...]
"""

from __future__ import annotations

import json
import sys

from tests.nbd.decode import decode
from tests.nbd.record_qsd_nbd import DEFAULT_OUT


def main() -> None:
    data = json.loads(DEFAULT_OUT.read_text())
    print(data["qsd_version"], "handshake timeout", data["handshake_timeout_s"], "s")
    for group in ("scenarios", "tls_scenarios"):
        for name, steps in data[group].items():
            if sys.argv[1:] and name not in sys.argv[1:]:
                continue
            print("==", name)
            for i, step in enumerate(steps):
                print(f"  [{i}] sent {len(step['send']) // 2} B, closed={step['closed']}")
                for line in decode(bytes.fromhex(step["recv"])):
                    print("     ", line[:160])


if __name__ == "__main__":
    main()
