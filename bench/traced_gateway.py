"""``python -m rnr_gateway run`` under ``tracemalloc``, for bench/soak.py ``--trace``.

A thread writes ``TRACED <seconds> <traced KiB> <gc-tracked objects>`` to stderr every
``TRACE_EVERY_S`` seconds (default 10): the memory Python's allocators hold and the
objects the garbage collector tracks, which grow with a leak in Python code whatever
the allocator does with the pages. Tracing costs CPU and memory of its own (RSS is
higher than without it), so a soak reports RSS from a run without ``--trace``.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
import tracemalloc

from rnr_gateway.cli import main


def report(every_s: float) -> None:
    start = time.monotonic()
    while True:
        time.sleep(every_s)
        traced, _ = tracemalloc.get_traced_memory()
        line = f"TRACED {time.monotonic() - start:.0f} {traced // 1024} {len(gc.get_objects())}"
        print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    tracemalloc.start(1)
    every = float(os.environ.get("TRACE_EVERY_S", "10"))
    threading.Thread(target=report, args=(every,), name="trace", daemon=True).start()
    raise SystemExit(main(["run"]))
