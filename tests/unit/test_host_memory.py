"""train.runtime.keep_freed_host_memory: freed CPU tensors' memory is reused, not faulted in again from the OS."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# In a fresh interpreter (mallopt is process-wide): page faults of allocating, filling and freeing a 64 MiB
# tensor five times, before and after the call. Default glibc serves a block this large from mmap and
# unmaps it on free, so every round faults its 16K pages in again; kept, the rounds reuse the pages.
PROBE = """
import resource, torch
from train.runtime import keep_freed_host_memory

def faults_of_rounds():
    torch.empty(16 << 20).fill_(1.0)  # a first round maps the pages
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.empty(16 << 20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults_of_rounds()
applied = keep_freed_host_memory()
kept = faults_of_rounds()
print(default, applied, kept)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_memory_is_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    default, applied, kept = int(out[0]), out[1] == "True", int(out[2])
    round_pages = (64 << 20) // 4096
    assert applied
    assert default >= 4 * round_pages, (default, round_pages)  # by default every round faults its pages in again
    # kept: at most one more round of new pages (where the heap first grows past the block freed), then reuse
    assert kept <= round_pages + 256, (kept, round_pages)
