"""``python -m rnr_gateway run`` with its memory reported from inside, for bench/soak.py.

A thread writes ``TRACED <seconds> <traced KiB> <gc-tracked objects> <malloc in use KiB>
<malloc free KiB>`` to stderr every ``TRACE_EVERY_S`` seconds (default 10):

- with ``TRACE_PYTHON=1`` (``--trace``), the memory Python's allocators hold
  (``tracemalloc``; -1 without it) and the objects the garbage collector tracks, which
  grow with a leak in Python code whatever the allocator does with its pages. Tracing
  costs CPU and memory of its own (RSS is higher than without it);
- always, glibc's own count (``mallinfo2``, every arena): the bytes handed out by malloc
  and not freed, which grow with a leak anywhere in the process, C extensions included,
  and the bytes freed but kept by the allocator, which grow with fragmentation instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys
import threading
import time
import tracemalloc

from rnr_gateway.cli import main


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def malloc_kib() -> tuple[int, int]:
    """(in use, free but kept) by glibc's malloc, KiB; (-1, -1) without glibc 2.33+."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return -1, -1
    info = libc.mallinfo2()
    return (info.uordblks + info.hblkhd) // 1024, info.fordblks // 1024


def report(every_s: float) -> None:
    start = time.monotonic()
    while True:
        time.sleep(every_s)
        traced = tracemalloc.get_traced_memory()[0] // 1024 if tracemalloc.is_tracing() else -1
        used, free = malloc_kib()
        line = f"TRACED {time.monotonic() - start:.0f} {traced} {len(gc.get_objects())}"
        print(f"{line} {used} {free}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    if os.environ.get("TRACE_PYTHON") == "1":
        tracemalloc.start(1)
    every = float(os.environ.get("TRACE_EVERY_S", "10"))
    threading.Thread(target=report, args=(every,), name="trace", daemon=True).start()
    raise SystemExit(main(["run"]))
