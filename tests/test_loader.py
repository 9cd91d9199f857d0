"""data/loader.py: loader workers die with the training process."""

import os
import subprocess
import sys
import time

import pytest
from conftest import (
    DEMO_CLI,
    ROOT,
    out_args,
    process_alive,
)


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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_loader_workers_exit_when_their_run_is_killed(tmp_path):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *DEMO_CLI,
                             "-o", "data.num_workers=2", *out_args(tmp_path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, workers = time.time() + 120, []
    while len(workers) < 2 and time.time() < deadline:
        workers = _children(proc.pid)
        time.sleep(0.1)
    assert len(workers) >= 2
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while any(process_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(process_alive(w) for w in workers)
