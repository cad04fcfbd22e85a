"""Run a qmpd with chosen :class:`~qmpd.daemon.Limits` (no CLI flag sets them).

    python -m tests.reliability.limited_daemon SOCKET '{"max_connections": 4}'
"""

from __future__ import annotations

import json
import sys

import trio

from qmpd.daemon import Daemon, Limits


def main() -> None:
    path, limits = sys.argv[1], json.loads(sys.argv[2])
    trio.run(Daemon(limits=Limits(**limits)).serve, [path])


if __name__ == "__main__":
    main()
