"""After `kill -9` of a command with worker processes, none of its processes is left (issue 22.11)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest

from conftest import make_run, write_fmnist_folder
from sjea_tools.workers import end_with_parent

SJEA = str(Path(sys.executable).with_name("sjea"))
GONE_WITHIN_S = 5.0  # the promise of issue 22: no process of a killed command after 5 s
START_DEADLINE_S = 120.0  # generous: only a broken start reaches it


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _descendants(pid: int) -> dict[int, str]:
    """pid -> its /proc start time (a reused pid is another process)."""
    out, todo = {}, [pid]
    while todo:
        for child in _children(todo.pop()):
            out[child] = _start_time(child)
            todo.append(child)
    return out


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


def _alive(pid: int, started: str) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and _start_time(pid) == started  # a zombie has ended (init reaps it)


def _kill_and_wait_for(proc: subprocess.Popen, want_children: int) -> list[int]:
    """SIGKILL proc once it has want_children descendants; the ones still alive GONE_WITHIN_S later."""
    deadline = time.monotonic() + START_DEADLINE_S
    kids: dict[int, str] = {}
    while time.monotonic() < deadline and proc.poll() is None and len(kids) < want_children:
        kids = _descendants(proc.pid)
        time.sleep(0.05)
    assert proc.poll() is None, f"the command ended before it could be killed: {proc.stderr.read()}"
    assert len(kids) >= want_children, f"only {len(kids)} worker process(es) appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone_by = time.monotonic() + GONE_WITHIN_S
    while time.monotonic() < gone_by and any(_alive(p, t) for p, t in kids.items()):
        time.sleep(0.05)
    left = [p for p, t in kids.items() if _alive(p, t)]
    for p in left:  # do not leak them into the rest of the suite
        os.kill(p, signal.SIGKILL)
    return left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkilled_embed_leaves_no_decode_worker(tmp_path, fmnist_test):
    run = make_run(tmp_path / "run")
    folder = write_fmnist_folder(tmp_path / "imgs", fmnist_test, 600)
    cmd = [SJEA, "embed", str(folder), str(tmp_path / "out.h5"), "--run", str(run), "--backend", "torch",
           "--workers", "2", "--batch-size", "2", "--no-index", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    left = _kill_and_wait_for(proc, want_children=2)
    assert not left, f"worker process(es) {left} outlived the killed `sjea embed`"


LOADER = """
import time, torch
from sjea_tools.workers import end_with_this_process

class Slow(torch.utils.data.Dataset):
    def __len__(self):
        return 10**6
    def __getitem__(self, i):
        time.sleep(0.01)
        return i

for _ in torch.utils.data.DataLoader(Slow(), num_workers=2, worker_init_fn=end_with_this_process()):
    pass
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_dataloader_worker_init_ends_with_its_parent():
    """The training and evaluation loaders pass the same worker_init_fn (torch's own watchdog
    alone polls every 5 s, the whole allowance)."""
    proc = subprocess.Popen([sys.executable, "-c", LOADER], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    assert not _kill_and_wait_for(proc, want_children=2)


def test_end_with_parent_accepts_a_worker_id():
    init = partial(end_with_parent, os.getpid())  # the child's parent (this process) lives: nothing happens
    child = os.fork()
    if child == 0:
        try:
            init(3)
        finally:
            os._exit(0 if os.getppid() != 1 else 2)
    _, status = os.waitpid(child, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
