"""data/loader.py: loader workers die with the training process."""

import os
import subprocess
import sys
import time

import pytest
from conftest import DEMO_CLI, HANG_S, ROOT, out_args, process_alive


def _children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_loader_workers_exit_when_their_run_is_killed(tmp_path):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *DEMO_CLI,
                             "-o", "data.num_workers=2", *out_args(tmp_path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, workers = time.time() + HANG_S, []
    while len(workers) < 2 and time.time() < deadline and proc.poll() is None:
        workers = _children(proc.pid)
        time.sleep(0.1)
    assert len(workers) >= 2
    proc.kill()
    proc.wait()
    deadline = time.time() + HANG_S  # they die at once; only a hang waits this long
    while any(process_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(process_alive(w) for w in workers)


@pytest.mark.slow
def test_workers_of_a_cut_iteration_end_quietly_with_their_process():
    """Workers ignore stop signals (the training process handles them); a process that
    exits in the middle of an epoch still ends at once, its workers killed without Paddle's
    "DataLoader process ... killed" report."""
    code = ("import numpy as np, paddle\n"
            "from data.loader import build_loader\n"
            "class Blank(paddle.io.Dataset):\n"
            "    def __len__(self):\n"
            "        return 64\n"
            "    def __getitem__(self, i):\n"
            "        return np.zeros((8, 8, 3), np.uint8), np.int64(i % 4)\n"
            "batches = iter(build_loader(Blank(), 4, 2, train=True))\n"
            "next(batches)\n"
            "print('cut', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=HANG_S)
    assert proc.returncode == 0 and proc.stdout.strip() == "cut", proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "killed" not in proc.stderr, proc.stderr[-2000:]


def _start_worker(parent, done):
    from data.loader import _init_worker

    _init_worker(parent, 0)
    done.put("started")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_a_worker_starts_under_every_start_method(method):
    """Under forkserver (Python 3.14's default) and spawn a worker's parent is a server, not
    the training process: the worker is tied to the server and starts."""
    import multiprocessing

    context = multiprocessing.get_context(method)
    done = context.Queue()
    worker = context.Process(target=_start_worker, args=(os.getpid(), done))
    worker.start()
    worker.join(timeout=HANG_S)
    assert worker.exitcode == 0 and done.get(timeout=HANG_S) == "started"
