"""Seeded differential runs against qemu-storage-daemon 7.2 (tests/tools/differential.py).

CI runs a fixed seed and a few sequences; by hand::

    .venv/bin/python -m pytest tests/integration/test_differential_qsd.py \\
        --diff-seed N --diff-count M
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Iterator

import pytest

from tests.oracles import require
from tests.tools import differential

pytestmark = pytest.mark.interop

#: What CI runs: a fixed seed, few sequences (about 35 s on two busy cores).
CI_SEED = 20240612
CI_COUNT = 3


@pytest.fixture(scope="module")
def pristine() -> Iterator[str]:
    for tool in ("qemu-storage-daemon", "qemu-img", "qemu-io", "cryptsetup"):
        require(tool)
    path = tempfile.mkdtemp(prefix="diff-img-")
    differential.make_images(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "diff_seed" in metafunc.fixturenames:
        # defaults here too: the options exist only when this conftest loads first
        first = metafunc.config.getoption("diff_seed", default=CI_SEED)
        count = metafunc.config.getoption("diff_count", default=CI_COUNT)
        metafunc.parametrize("diff_seed", range(first, first + count),
                             ids=[f"seed{s}" for s in range(first, first + count)])


def test_same_as_qsd(diff_seed: int, pristine: str) -> None:
    steps, outcome = differential.run_sequence(diff_seed, pristine)
    assert not outcome.divergences, (
        f"seed {diff_seed}: qmpd differs from qsd 7.2 "
        f"(replay: python -m tests.tools.differential --seed {diff_seed} --count 1):\n"
        + "\n".join(outcome.divergences))
