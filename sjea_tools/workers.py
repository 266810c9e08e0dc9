"""Worker processes that end when their parent dies: a SIGKILLed, OOM-killed or timed-out command
leaves no decode worker behind (each holds hundreds of MB, and a pool's workers otherwise wait on
their task queue for good, re-parented to init).

`end_with_this_process()` is the initializer to give: an executor's `initializer`, a torch
DataLoader's `worker_init_fn` (the worker id it passes is ignored).
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import time

# How often the fallback watchdog looks for a new parent (where PR_SET_PDEATHSIG is unavailable).
WATCH_EVERY_S = 0.5
_PR_SET_PDEATHSIG = 1


def end_with_parent(parent_pid: int, *_worker_id) -> None:
    """Make this process end when `parent_pid` (the process that started it) dies.

    Linux: the kernel sends SIGKILL on the parent's death (prctl PR_SET_PDEATHSIG; it fires when
    the *thread* that forked exits, so start workers from a thread that outlives them, as a pool
    used inside one `with` block is). Everywhere: a daemon thread exits once the parent changes."""
    _ask_kernel()
    if os.getppid() != parent_pid:  # the parent died before the request above: no signal will come
        os._exit(1)
    threading.Thread(target=_watch, args=(parent_pid,), daemon=True, name="end-with-parent").start()


def _ask_kernel() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl in this libc: the watchdog still ends us
        pass


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(WATCH_EVERY_S)
    os._exit(1)


def end_with_this_process():
    """The initializer for workers started by this process (executor initializer, DataLoader
    worker_init_fn): they end when this process dies."""
    return functools.partial(end_with_parent, os.getpid())
