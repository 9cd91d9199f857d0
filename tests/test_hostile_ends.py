"""Hostile input, round 2 (end): signals while Paddle loads, full disks, the words of a
run's end, and paths, archive members and records of the wrong kind."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
from conftest import (
    DEMO_CLI,
    FAST_CLI,
    ROOT,
    assert_one_error,
    run_stages_with_loss,
    digits_cifar_archive,
    out_args,
    run_script,
)

DEMO, FAST = DEMO_CLI, FAST_CLI



# 9. Signals, full disks and the words of the end ----------------------------------------

def _has_loaded_paddle(pid):
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8") as handle:
            return "libpaddle" in handle.read()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_as_soon_as_paddle_is_loaded_is_one_line(tmp_path):
    """Paddle's import installs a C++ SIGTERM handler that printed a "FatalError" dump; a
    SIGTERM from then on, while the rest imports and the data loads, ends in one line."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *DEMO,
                             *out_args(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not _has_loaded_paddle(proc.pid) and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert "FatalError" not in stderr and "C++ Traceback" not in stderr, stderr[-2000:]
    assert proc.returncode == 143, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith(("error: interrupted (SIGTERM)",
                                                       "interrupted: SIGTERM"))


NO_SPACE = """
import errno, os, runpy, sys
def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
import utils.checkpoint
utils.checkpoint.save_tensors = full
sys.argv = ["main.py", *sys.argv[1:]]
runpy.run_path("main.py", run_name="__main__")
"""


def test_a_full_disk_before_any_checkpoint_says_none_was_kept(tmp_path):
    proc = subprocess.run([sys.executable, "-c", NO_SPACE, *DEMO, *FAST, *out_args(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    line = assert_one_error(proc, "No space left on device", "no checkpoint was saved there yet")
    assert "None" not in line and "previous checkpoint" not in line


def test_no_space_without_a_file_name_says_no_none():
    code = ("import errno, os, sys; sys.path.insert(0, '.')\n"
            "from utils import cli\n"
            "def main():\n    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
            "cli.run(main)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert_one_error(proc, "No space left on device")
    assert "None" not in proc.stderr


def test_a_stop_after_the_last_epoch_is_not_an_interruption(tmp_path, monkeypatch, capsys):
    from main import train
    from training.run import Run
    from utils.config import load_config

    real = Run.checkpoint

    def stop_at_the_end(self, position, progress):
        real(self, position, progress)
        if position.stage == len(self.cfg.stages):
            self.stops.signum = signal.SIGINT  # as if Ctrl-C came now

    monkeypatch.setattr(Run, "checkpoint", stop_at_the_end)
    out = str(tmp_path / "run")
    best = train(load_config("configs/demo.yaml", [
        f"train.output_dir={out}", "data.train_subset=128", "data.val_subset=40",
        "stages.0.epochs=1", "stages.1.epochs=1"]))
    assert best is not None
    assert "SIGINT after the last epoch: training is complete" in capsys.readouterr().out


def test_an_epoch_of_skipped_steps_records_no_loss_and_standard_json(tmp_path, monkeypatch):
    from losses.rdrop import RDropLoss
    from main import train
    from utils.config import load_config

    loss = RDropLoss(alpha=1.0)

    def nan_loss(logits, labels):
        return {k: v * float("nan") for k, v in loss(logits, labels).items()}

    nan_loss.copies = 2
    run_stages_with_loss(monkeypatch, lambda index: nan_loss if index == 0 else None)
    out = str(tmp_path / "run")
    train(load_config("configs/demo.yaml", [
        f"train.output_dir={out}", "data.train_subset=128", "data.val_subset=40",
        "data.batch_size=32", "stages.0.epochs=1", "stages.1.epochs=1",
        "train.nan_policy=skip", "train.nan_max_skips=100"]))
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    records = [json.loads(line, parse_constant=lambda name: pytest.fail(name)) for line in lines]
    assert records[0]["train_loss"] is None and records[0]["grad_norm"] is None
    assert records[1]["train_loss"] > 0


# Beyond the list: more paths of the wrong kind, odd archive members, damaged records ------

def test_more_paths_of_the_wrong_kind_are_one_line(tmp_path):
    cases = [
        (["main.py", "-c", str(tmp_path), "--dry-run"], "is a folder, not a file"),
        (["main.py", *DEMO, "-o", "train.output_dir=''"], "train.output_dir is empty"),
        (["val.py", *DEMO, "--weights", str(tmp_path)], "is a folder, not a file"),
        (["val.py", *DEMO, "--weights", "/dev/zero"], "is not a regular file"),
        (["main.py", *DEMO, *out_args(tmp_path), "--resume", "/dev/zero"],
         "no complete checkpoint to resume in /dev/zero"),
        (["predict.py", *DEMO, "--model-dir", "/dev/null",
          os.path.join(ROOT, "docs", "demo_predictions.png")], "is not a regular file"),
    ]
    for (script, *args), message in cases:
        assert_one_error(run_script(script, *args, timeout=120), message)


def test_links_in_a_cifar_archive_are_not_followed(tmp_path):
    path = tmp_path / "links.tar.gz"
    digits_cifar_archive(path)
    with tarfile.open(path) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive if m.isfile()]
    with tarfile.open(path, "w:gz") as archive:
        for member, data in members:
            if not member.name.endswith("train"):
                archive.addfile(member, __import__("io").BytesIO(data))
        link = tarfile.TarInfo("cifar-100-python/train")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    proc = run_script("main.py", *DEMO, "-o", "data.name=cifar100", "-o", f"data.path={path}",
                      *out_args(tmp_path))
    assert_one_error(proc, "no 'train' split found")


def test_a_damaged_metrics_file_is_one_line_for_the_plots(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"stage": 0, "epoch": 0}\n{"stage": 0, "ep\n')
    proc = subprocess.run([sys.executable, "-m", "utils.reports.plots", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert_one_error(proc, "line 2 of", "is damaged")
