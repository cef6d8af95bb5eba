"""The CPU training allocator setting: freed large blocks stay in the process instead of going back to
the kernel (checked in a fresh interpreter per case, since the setting is process-wide)."""

import os
import subprocess
import sys

import pytest

from qattune.training.host_allocator import ENV_VAR

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt (Linux)")

_PROBE = """
import os
from qattune.training.host_allocator import keep_freed_host_memory

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

applied = keep_freed_host_memory()
before = rss_mib()
block = b"\x01" * (256 * 2**20)  # written byte by byte: every page is resident
held = rss_mib()
del block
print(applied, round(held - before), round(held - rss_mib()))
"""


def _probe(allocator: str) -> tuple[str, int, int]:
    """(whether the setting applied, MiB the block added to the resident set, MiB freeing it gave back)."""
    env = {**os.environ, ENV_VAR: allocator}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    applied, grew_mib, returned_mib = out.stdout.split()
    return applied, int(grew_mib), int(returned_mib)


def test_keep_freed_keeps_a_freed_block_resident():
    applied, grew_mib, returned_mib = _probe("keep_freed")
    assert applied == "True" and grew_mib > 200
    assert returned_mib < 16  # the 256 MiB stays in the heap for the next step


def test_default_allocator_gives_a_freed_block_back():
    applied, grew_mib, returned_mib = _probe("default")
    assert applied == "False" and grew_mib > 200
    assert returned_mib > 200  # glibc's mmap path unmapped it on free
