"""utils/run_folder.py: one run per output folder, an earlier run never written over or
mixed in, a finished run recognised."""

import os
import subprocess
import sys
import time

import pytest
from conftest import (
    DEMO_CLI,
    FAST_CLI,
    HANG_S,
    ROOT,
    SAVING_RUN_CLI,
    assert_one_error,
    out_args,
    read_records,
    run_script,
)

from utils.errors import UserError
from utils.run_folder import RunFolder


@pytest.mark.slow
def test_a_second_run_into_a_held_folder_stops_and_the_first_keeps_its_records(tmp_path):
    out = tmp_path / "run"
    # Long enough (about 30 steps after the lock) that the first run still holds its folder
    # when the second has started: a finished one would be reported complete instead.
    args = [sys.executable, os.path.join(ROOT, "main.py"), *DEMO_CLI, *FAST_CLI, "-o",
            "data.train_subset=512", "-o", "stages.0.epochs=2", "-o", f"train.output_dir={out}"]
    first = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.time() + HANG_S
    while not (out / "run.lock").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    second = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    assert_one_error(second, f"train.output_dir {out} is in use by another run (pid "
                             f"{first.pid} on")
    assert first.wait(timeout=HANG_S) == 0, first.stderr.read()[-2000:]
    assert [(r["stage"], r["epoch"]) for r in read_records(str(out))] == [(0, 1), (0, 2), (1, 1)]


@pytest.mark.slow
def test_a_fresh_run_never_writes_over_an_earlier_one(trained, tmp_path):
    before = {name: open(os.path.join(trained, name), "rb").read()
              for name in ("metrics.jsonl", "config.yaml", "best.safetensors")}
    # The same command again: the run is complete, nothing is trained or written, exit 0.
    proc = run_script("main.py", *DEMO_CLI, *FAST_CLI, "-o", f"train.output_dir={trained}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"the run in {trained} is complete with this config" in proc.stdout
    assert "best val top1" in proc.stdout.splitlines()[-1]
    # Another config: one error, and no --resume offered for a finished run.
    proc = run_script("main.py", *DEMO_CLI, *FAST_CLI, "-o", f"train.output_dir={trained}",
                      "-o", "train.seed=1")
    line = assert_one_error(proc, f"train.output_dir {trained} already holds a finished run "
                                  f"(2 epochs)", "--overwrite")
    assert "--resume" not in line
    for name, data in before.items():
        assert open(os.path.join(trained, name), "rb").read() == data, name
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", trained, str(copy)], check=True)
    proc = run_script("main.py", *DEMO_CLI, *FAST_CLI, "-o", f"train.output_dir={copy}", "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    moved = [p for p in os.listdir(tmp_path) if p.startswith("copy.old-")]
    assert len(moved) == 1 and f"moved the earlier contents of {copy} to" in proc.stdout
    assert os.path.isdir(tmp_path / moved[0] / "inference")  # the old run, whole
    assert not (copy / "inference").exists() and not (copy / "val_metrics.json").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "thesis.tex").write_text("not a run")
    proc = run_script("main.py", *DEMO_CLI, *FAST_CLI, *out_args(tmp_path, "other"))
    assert_one_error(proc, "already holds 1 other entries (e.g. thesis.tex)")
    proc = run_script("main.py", *DEMO_CLI, *FAST_CLI, *out_args(tmp_path, "other"), "--overwrite")
    assert_one_error(proc, "holds files that no run wrote (e.g. thesis.tex); --overwrite moves "
                           "only earlier runs")
    assert (tmp_path / "other" / "thesis.tex").exists()


@pytest.mark.slow
def test_overwrite_checks_what_the_run_reads_before_moving_anything(trained, tmp_path):
    """--overwrite with the weights to start from inside the folder it moves aside, or run
    from inside that folder (-c .): one line, nothing moved; a missing input is named before
    the folder is touched; a rename the OS refuses is one line."""
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", trained, str(copy)], check=True)
    listing = sorted(os.listdir(copy))
    proc = run_script("main.py", "-c", str(copy), "--overwrite", "--init-from", str(copy))
    assert_one_error(proc, f"model.pretrained {copy}/best.safetensors lies in train.output_dir "
                           f"{copy}, which --overwrite moves aside", "copy it out")
    inside = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "-c", ".",
                             "--overwrite"], cwd=str(copy), capture_output=True, text=True,
                            timeout=HANG_S)
    assert_one_error(inside, f"train.output_dir {copy} holds the current folder", "cd ..")
    proc = run_script("main.py", "-c", str(copy), "--overwrite", "--init-from",
                      str(tmp_path / "gone"))
    assert_one_error(proc, f"model.pretrained {tmp_path}/gone does not exist")
    fresh = tmp_path / "fresh"
    proc = run_script("main.py", *DEMO_CLI, "-o", f"train.output_dir={fresh}", "-o",
                      "data.name=folder", "-o", f"data.path={tmp_path}/no-photos")
    assert_one_error(proc, f"data.path {tmp_path}/no-photos does not exist")
    assert sorted(os.listdir(copy)) == listing  # nothing moved aside, no folder made
    assert sorted(os.listdir(tmp_path)) == ["copy"]


def test_a_rename_the_os_refuses_is_one_line(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("{}\n")

    def refused(source, target):
        raise OSError(16, "Device or resource busy", source)

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(UserError, match=r"--overwrite could not move .* \(Device or resource "
                                        r"busy\); move the earlier run yourself"):
        RunFolder(str(folder)).hold(overwrite=True)
    assert (folder / "metrics.jsonl").exists()


@pytest.mark.slow
def test_output_folders_that_cannot_be_folders_are_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_error(run_script("main.py", *DEMO_CLI, "-o", f"train.output_dir={blocker}"),
                     "is a file, not a folder")
    assert_one_error(run_script("main.py", *DEMO_CLI, "-o", f"train.output_dir={blocker}/run"),
                     f"lies under {blocker}, which is a file")
    assert_one_error(run_script("val.py", *DEMO_CLI, "-o", f"train.output_dir={blocker}/run"),
                     f"lies under {blocker}, which is a file")


@pytest.mark.slow
def test_a_run_that_wrote_nothing_leaves_no_folder_and_no_lock(tmp_path):
    """Refused at its start (here a --resume with nothing to resume): the folder it made
    and its run.lock are gone; a folder that was there stays, without the lock."""
    new, empty, used = tmp_path / "new", tmp_path / "empty", tmp_path / "used"
    empty.mkdir()
    for path in (new, empty, used):
        folder = RunFolder(str(path))
        folder.hold()
        if path == used:
            (path / "metrics.jsonl").write_text("{}\n")
        folder.release()
    assert not new.exists() and os.listdir(empty) == [] and \
        sorted(os.listdir(used)) == ["metrics.jsonl", "run.lock"]
    missing = tmp_path / "never trained"
    assert_one_error(run_script("main.py", *DEMO_CLI, "-o", f"train.output_dir={missing}",
                                "--resume"), "no complete checkpoint to resume")
    assert not missing.exists()


def test_overwrite_never_replaces_a_linked_output_folder(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "metrics.jsonl").write_text("{}\n")
    link = tmp_path / "output"
    link.symlink_to(real)
    with pytest.raises(UserError, match="is a symbolic link, which --overwrite would replace"):
        RunFolder(str(link)).hold(overwrite=True)
    assert link.is_symlink() and (real / "metrics.jsonl").exists()


@pytest.mark.slow
def test_resuming_a_finished_run_changes_nothing(tmp_path):
    out = str(tmp_path / "run")
    assert run_script("main.py", *SAVING_RUN_CLI, "-o", f"train.output_dir={out}").returncode == 0
    files = {os.path.join(r, n): os.stat(os.path.join(r, n)).st_mtime_ns
             for r, _, names in os.walk(out) for n in names if n != "run.lock"}
    proc = run_script("main.py", *SAVING_RUN_CLI, "-o", f"train.output_dir={out}", "--resume")
    assert proc.returncode == 0 and f"the run in {out} is complete" in proc.stdout
    assert {path: os.stat(path).st_mtime_ns for path in files} == files
    assert not any(f for f in os.listdir(os.path.join(out, "vdl")) if f != "vdlrecords.run.log")


@pytest.mark.slow
def test_a_run_stopped_before_its_final_test_is_finished_by_resume(trained, tmp_path):
    """Every stage trained, the final test not run (killed during it): the same command says
    that --resume finishes it, and --resume does."""
    import json

    copy = tmp_path / "untested"
    subprocess.run(["cp", "-r", trained, str(copy)], check=True)
    state_path = copy / "last" / "state.json"
    state = json.loads(state_path.read_text())
    state["tested"] = False
    state_path.write_text(json.dumps(state))
    with open(copy / "metrics.jsonl", encoding="utf-8") as handle:  # its test records gone
        kept = [line for line in handle if '"test"' not in line]
    (copy / "metrics.jsonl").write_text("".join(kept))
    proc = run_script("main.py", *DEMO_CLI, *FAST_CLI, "-o", f"train.output_dir={copy}")
    assert_one_error(proc, "stopped before its final test", "finish it with --resume")
    proc = run_script("main.py", *DEMO_CLI, *FAST_CLI, "-o", f"train.output_dir={copy}",
                      "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(read_records(str(copy), test=True)) == 2  # best and last


@pytest.mark.slow
def test_a_finished_run_without_its_best_weights_is_not_called_complete(trained, tmp_path):
    """best.safetensors deleted or damaged: the same command says so and what to do instead
    of "complete" (val.py would say "train first": the two would send the user in a circle)."""
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", trained, str(copy)], check=True)
    args = [*DEMO_CLI, *FAST_CLI, "-o", f"train.output_dir={copy}"]
    (copy / "best.safetensors").write_bytes((copy / "best.safetensors").read_bytes()[:-10])
    assert_one_error(run_script("main.py", *args), "has finished, but its best weights are not "
                     "usable", f"--weights {copy}/last/raw.safetensors", "--overwrite")
    os.remove(copy / "best.safetensors")
    assert_one_error(run_script("main.py", *args), "has finished, but its best weights")


def test_an_unfinished_run_is_described_with_the_epoch_a_resume_reports(tmp_path):
    """Positions count epochs from 0; people, and the resume's progress line, from 1."""
    import json

    from utils.run_folder import _describe

    (tmp_path / "last").mkdir()
    (tmp_path / "last" / "state.json").write_text(json.dumps(
        {"position": {"stage": 1, "epoch": 19, "micro": 3}, "config": {"stages": [{}, {}]}}))
    assert _describe(str(tmp_path)) == ("an unfinished run (next: stage 1, epoch 20, "
                                        "micro-batch 3)")


@pytest.mark.slow
def test_a_folder_inside_a_run_or_resume_with_overwrite_is_one_line(tmp_path):
    """-c naming the run's last/ (or any folder in it) says which folder to pass; --resume
    with --overwrite (continue and start afresh) is refused before anything runs."""
    from training.config import load_config

    run = tmp_path / "run"
    (run / "last").mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    with pytest.raises(UserError, match=f"-c {run}/last is a folder inside the run folder "
                                        f"{run}; pass -c {run}$"):
        load_config(str(run / "last"))
    proc = run_script("main.py", "-c", str(run), "--resume", "--overwrite")
    assert proc.returncode == 2 and "--overwrite" in proc.stderr.splitlines()[-1]
    assert sorted(os.listdir(run)) == ["config.yaml", "last"]
    from main import train  # the notebook's RESUME = True with OVERWRITE = True

    with pytest.raises(UserError, match="choose one of them"):
        train(load_config("configs/demo.yaml", [f"train.output_dir={run}"]), resume=True,
              overwrite=True)
    assert sorted(os.listdir(run)) == ["config.yaml", "last"]
