"""A C loop for the wipe's two passes, built only to show what Python's per-page cost is.

The issue allows a C helper only if Python truly cannot reach a target and the
difference is shown.  This module is that measurement, nothing more: the
agent does not use it.  It compiles a 10-line function with the system C
compiler into the benchmark's temp directory and loads it with ctypes; when
no compiler is found the comparison is skipped.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from array import array
from collections.abc import Callable
from pathlib import Path

SOURCE = r"""
#include <stddef.h>
#include <stdint.h>
#include <string.h>
static const unsigned char zero[1 << 20];
/* memset every span, then memcmp every span against zeros: the engine's zero and verify
   passes over a mapping of guest RAM.  Returns the first bad span's index, or -1. */
long zero_and_check(const uint64_t *addr, const uint64_t *len, size_t n) {
    for (size_t i = 0; i < n; i++) memset((void *)(uintptr_t)addr[i], 0, len[i]);
    for (size_t i = 0; i < n; i++)
        if (memcmp((void *)(uintptr_t)addr[i], zero, len[i])) return (long)i;
    return -1;
}
"""


def build(directory: Path) -> Callable[[array[int], array[int]], int] | None:
    """Compile and load the helper; None when there is no C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src, lib = directory / "zero_and_check.c", directory / "zero_and_check.so"
    src.write_text(SOURCE)
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    fn = ctypes.CDLL(str(lib)).zero_and_check
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    fn.restype = ctypes.c_long

    def run(addrs: array[int], lens: array[int]) -> int:
        a, _ = addrs.buffer_info()
        b, _ = lens.buffer_info()
        return int(fn(a, b, len(addrs)))
    return run
