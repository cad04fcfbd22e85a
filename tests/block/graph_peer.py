"""A BlockGraph in its own process, driven line by line (for sharing tests).

stdin: one JSON command a line: ["add", options] | ["amend", node, options] |
["reopen", [options...]] | ["close"]. stdout: "ok" or "ERR <text>" a line.
"""

import json
import sys

import trio

from qmpd.block import blockdev
from qmpd.block import amend as block_amend
from qmpd.block.graph import BlockGraph
from qmpd.errors import QMPError


class Secrets:
    def __init__(self, values: dict[str, str]) -> None:
        self.values = values

    def lookup(self, secret_id: str) -> bytearray:
        if secret_id not in self.values:
            raise QMPError.generic(f"No secret with id '{secret_id}'")
        return bytearray(self.values[secret_id].encode())


class NoProgress:
    def set(self, current: int, total: int) -> None:
        pass


async def main() -> None:
    graph = BlockGraph(Secrets(json.loads(sys.argv[1])))
    for line in sys.stdin:
        command = json.loads(line)
        try:
            if command[0] == "add":
                await blockdev.add(graph, command[1])
            elif command[0] == "amend":
                await block_amend.run(graph, command[1], command[2], False, NoProgress(), "blockdev-amend")
            elif command[0] == "reopen":
                await blockdev.reopen(graph, command[1])
            elif command[0] == "close":
                await graph.close_all()
            print("ok", flush=True)
        except QMPError as err:
            print("ERR " + err.desc, flush=True)
        if command[0] == "close":
            return


if __name__ == "__main__":
    trio.run(main)
