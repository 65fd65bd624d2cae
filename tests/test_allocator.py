"""scpl_kit.allocator: a freed large block stays in the process only once the setting is applied."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident set from /proc (Linux)")

# Allocate and touch 256 MiB, free it, and print how much of it is still resident.
PROBE = """
import sys, torch
from pathlib import Path
from scpl_kit.allocator import retain_freed_memory
def rss_mb():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024
if sys.argv[1] == "retain":
    assert retain_freed_memory()
before = rss_mb()
block = torch.ones(64 * 2**20)  # 256 MiB, far above glibc's 32 MiB ceiling for heap blocks
del block
print(rss_mb() - before)
"""


def resident_after_free(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def test_freed_activations_stay_resident_only_when_retained() -> None:
    assert resident_after_free("default") < 64  # glibc unmaps the block on free
    assert resident_after_free("retain") > 200  # kept in the heap for the next step to reuse
