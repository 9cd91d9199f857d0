"""Interruptions: SIGKILL, SIGTERM, SIGINT and SIGHUP during a run, kills during a save, a
full disk, a stop after the last epoch.

Each interrupted run is continued with ``--resume`` and must end exactly like the
uninterrupted one (same metrics.jsonl), which is trained once for the module.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import (
    DEMO_CLI,
    HANG_S,
    ROOT,
    SAVING_RUN_CLI,
    assert_one_error,
    kill_in_stage_1,
    read_records,
    run_script,
    split_resume_command,
)

from main import train
from training import engine
from training.config import load_config
from training.state import RunState
from utils.checkpoint import find_last, load_last, weights_path
from utils.errors import Interrupted, UserError
from utils.io.tensor_io import load_tensors

SMALL = ["data.train_subset=256", "data.val_subset=100", "data.batch_size=32"]
RUN = ["-c", "configs/demo.yaml", *[a for o in SMALL for a in ("-o", o)],
       "-o", "stages.0.epochs=2", "-o", "stages.1.epochs=2", "-o", "train.save_every_steps=3",
       "-o", "train.ema.enabled=true", "-o", "train.swa.enabled=true",
       "-o", "stages.0.warmup={steps: 4}", "-o", "train.accum_steps=2",
       "-o", "train.clip_grad_norm=5.0"]


def _main(out):
    return [sys.executable, os.path.join(ROOT, "main.py"), *RUN, "-o", f"train.output_dir={out}"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The uninterrupted run's metrics.jsonl records."""
    out = str(tmp_path_factory.mktemp("whole"))
    proc = subprocess.run(_main(out), cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return read_records(out)


def _assert_same_records(expected, got, epochs=4):
    assert len(got) == len(expected) == epochs
    for want, have in zip(expected, got):
        assert set(want) == set(have)
        for key in want:
            if want[key] is None:  # SWA not started yet
                assert have[key] is None, key
            elif key != "images_per_s":
                assert have[key] == pytest.approx(want[key], rel=1e-5, abs=1e-12), key


def _kill_midway(out):
    """Start the run and SIGKILL it once a mid-epoch checkpoint of the second stage exists."""
    proc = subprocess.Popen(_main(out), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    position = kill_in_stage_1(proc, out)
    return proc.returncode, position


@pytest.mark.slow
def test_sigkill_midway_then_resume_ends_like_an_uninterrupted_run(whole, tmp_path):
    killed = str(tmp_path / "killed")
    code, position = _kill_midway(killed)
    assert code == -signal.SIGKILL and position["stage"] == 1
    assert len(read_records(killed)) < 4
    resumed = run_script("main.py", *RUN, "-o", f"train.output_dir={killed}", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    _assert_same_records(whole, read_records(killed))
    assert whole[-1]["train_loss"] < whole[0]["train_loss"]
    with open(os.path.join(killed, "best.json"), encoding="utf-8") as handle:
        assert json.load(handle)["kind"] in ("raw", "ema", "swa")
    for kind in ("raw", "ema", "swa"):
        proc = run_script("val.py", "-c", "configs/demo.yaml", "-o", f"train.output_dir={killed}",
                          "--kind", kind)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip().splitlines()[-1].startswith("top1=")
    changed = run_script("main.py", *RUN, "-o", f"train.output_dir={killed}",
                         "-o", "loss.alpha=2.0", "--resume")
    assert_one_error(changed, "'loss.alpha' differs")


def _signal_at_stage_1(out, *signums, extra=(), group=False):
    """Run, send ``signums`` as soon as stage 1 starts (to the whole process group, loader
    workers included, as Ctrl-C in a terminal does, with ``group``); return (exit code, stderr)."""
    proc = subprocess.Popen([*_main(out), *extra], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=group)
    for line in proc.stdout:
        if line.startswith("[1] "):
            for signum in signums:
                (os.killpg if group else os.kill)(proc.pid, signum)
            break
    _, err = proc.communicate(timeout=HANG_S)
    return proc.returncode, err


@pytest.mark.slow
def test_sigterm_saves_says_how_to_resume_and_the_resumed_run_matches(whole, tmp_path):
    out = str(tmp_path / "term")
    code, err = _signal_at_stage_1(out, signal.SIGTERM)
    assert code == 143, err[-2000:]
    assert "Traceback" not in err
    line = [text for text in err.splitlines() if text.startswith("interrupted: ")][0]
    assert "SIGTERM at stage 1 epoch 1" in line and f"checkpoint saved in {out}/last" in line
    state, _ = load_last(find_last(out))
    assert state["position"]["stage"] == 1 and 0 < state["position"]["micro"] < 8
    printed = line.split("continue with: ", 1)[1]
    folder, command = split_resume_command(printed)
    # The interpreter that trained and main.py by its path: valid from any folder.
    assert folder == ROOT and command[:2] == [sys.executable, os.path.join(ROOT, "main.py")]
    assert command[-1] == "--resume"
    # The same command in the run folder, under a line that says what it needs.
    with open(os.path.join(out, "RESUME.txt"), encoding="utf-8") as handle:
        comment, kept = handle.read().splitlines()
    assert comment.startswith("# ") and sys.executable in comment and kept == printed
    resumed = subprocess.run(["bash", "-c", printed], cwd=str(tmp_path), capture_output=True,
                             text=True, timeout=HANG_S)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_records(whole, read_records(out))


@pytest.mark.slow
def test_ctrl_c_with_loader_workers_exits_130_with_a_checkpoint(tmp_path):
    out = str(tmp_path / "int")
    code, err = _signal_at_stage_1(out, signal.SIGINT, extra=["-o", "data.num_workers=2"],
                                   group=True)
    assert code == 130 and "Traceback" not in err
    assert "interrupted: SIGINT at stage 1" in err
    state, trees = load_last(find_last(out))
    assert state["position"]["stage"] == 1 and set(trees) == {"raw", "optimizer", "ema", "swa"}


@pytest.mark.slow
def test_a_repeated_signal_is_one_request_and_the_run_saves(tmp_path):
    """A sender that repeats its signal at once (paddle.distributed.launch: three SIGTERMs
    0.2 s apart) asks once: the run still stops after its step with a checkpoint."""
    out = str(tmp_path / "repeated")
    code, err = _signal_at_stage_1(out, signal.SIGINT, signal.SIGTERM, signal.SIGTERM)
    # The first signal the process records is the request (on a loaded machine another
    # thread can take SIGTERM before SIGINT reaches Python); the repeats add nothing.
    first = {130: "SIGINT", 143: "SIGTERM"}.get(code)
    assert first and "Traceback" not in err and "second" not in err, (code, err[-2000:])
    assert f"interrupted: {first} at stage 1" in err
    state, _ = load_last(find_last(out))
    assert state["position"]["stage"] == 1 and state["position"]["micro"] > 0


def test_a_second_request_after_the_repeat_window_exits_at_once(monkeypatch, capfd):
    """A person asking again (a second Ctrl-C seconds later) ends the process at once with
    128 + signal; the checkpoint saved before it is all there is."""
    from utils.runtime import signals

    clock, exits = [100.0], []

    def exit_now(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(signals.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(signals.os, "_exit", exit_now)
    with signals.StopRequests() as stops:
        os.kill(os.getpid(), signal.SIGINT)
        clock[0] += 0.4
        os.kill(os.getpid(), signal.SIGTERM)
        assert stops.requested == "SIGINT" and exits == []
        clock[0] += signals.REPEAT_WINDOW_S
        with pytest.raises(SystemExit):
            os.kill(os.getpid(), signal.SIGTERM)
    assert exits == [143]
    assert "error: second SIGTERM: exiting now" in capfd.readouterr().err


@pytest.mark.slow
def test_stop_during_evaluation_resumes_without_averaging_twice(tmp_path, monkeypatch):
    overrides = [*SMALL, "stages.0.epochs=1", "stages.1.epochs=2", "train.ema.enabled=true",
                 "train.swa.enabled=true"]
    whole_out, stopped_out = str(tmp_path / "whole"), str(tmp_path / "stopped")
    train(load_config("configs/demo.yaml", [*overrides, f"train.output_dir={whole_out}"]))
    cfg = load_config("configs/demo.yaml", [*overrides, f"train.output_dir={stopped_out}"])
    real_evaluate, calls = engine.evaluate, []

    def evaluate_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # stage 1 epoch 1: raw, then EMA (now), then SWA
            os.kill(os.getpid(), signal.SIGTERM)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", evaluate_then_signal)
    with pytest.raises(Interrupted) as stop:
        train(cfg)
    assert stop.value.exit_code == 143
    state, trees = load_last(find_last(stopped_out))
    assert state["position"] == {"stage": 1, "epoch": 0, "micro": 8, "evaluating": True}
    assert RunState.from_json(state).to_json() == {k: v for k, v in state.items() if k != "files"}
    assert state["updates"]["swa"] == 1
    monkeypatch.undo()
    train(cfg, resume=True)
    _assert_same_records(read_records(whole_out), read_records(stopped_out), epochs=3)
    final_whole, _ = load_last(find_last(whole_out))
    final_stopped, _ = load_last(find_last(stopped_out))
    assert final_stopped["updates"] == final_whole["updates"] == {"ema": 24, "swa": 2}


SAVE_LOOP = """
import sys
import numpy as np
from utils.checkpoint import save_best, save_last
out = sys.argv[1]
for version in range(1, 100000):
    model = {f"w{i}": np.full((256, 1024), version, np.float32) for i in range(4)}
    optimizer = {"m": np.full(4096, version, np.float32), "LR_Scheduler": {"last_epoch": version}}
    state = {"position": {"stage": 0, "epoch": 0, "micro": version}, "epoch_index": 0,
             "global_step": version, "skipped_steps": 0, "best": None, "progress": None,
             "updates": {}, "config": {}, "version": version}
    save_last(out, {"raw": model, "optimizer": optimizer}, state, ["a", "b"])
    save_best(out, model, {"version": version}, ["a", "b"])
    if version == 1:
        print("saved", flush=True)
"""


@pytest.mark.slow
def test_sigkill_at_random_moments_of_saving_leaves_a_loadable_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    versions = set()
    for attempt in range(20):
        out = str(tmp_path / f"kill{attempt}")
        proc = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, out], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "saved\n"
        time.sleep(rng.uniform(0.0, 0.4))
        proc.kill()
        proc.wait()
        state, trees = load_last(find_last(out))
        version = state["version"]
        versions.add(version)
        assert all(np.all(array == version) for array in trees["raw"].values())
        assert np.all(trees["optimizer"]["m"] == version)
        assert trees["optimizer"]["LR_Scheduler"] == {"last_epoch": version}
        best, metadata = load_tensors(weights_path(out, "best"))
        assert all(np.all(array == metadata["record"]["version"]) for array in best.values())
    assert len(versions) > 1  # the kills did land at different points of the loop


ENOSPC_AFTER_FIRST_EPOCH = """
import errno, os, runpy, sys
out = sys.argv[1]
metrics = os.path.join(out, "metrics.jsonl")
real_fsync = os.fsync
def fsync(fd):
    if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_fsync(fd)
os.fsync = fsync
sys.argv = ["main.py", *sys.argv[2:]]
runpy.run_path("main.py", run_name="__main__")
"""


@pytest.mark.slow
def test_disk_full_is_one_line_and_the_previous_checkpoint_survives(whole, tmp_path):
    out = str(tmp_path / "full")
    proc = subprocess.run([sys.executable, "-c", ENOSPC_AFTER_FIRST_EPOCH, out, *RUN,
                           "-o", f"train.output_dir={out}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=HANG_S)
    assert_one_error(proc, f"cannot save the checkpoint in {out} (No space left on device",
                     "the previous checkpoint there is kept", "--resume")
    state, _ = load_last(find_last(out))
    assert state["position"] == {"stage": 0, "epoch": 0, "micro": 12}  # steps 3 and 6 of 8, accum 2
    leftovers = [name for name in os.listdir(out) if name.endswith(".tmp") or "partial" in name]
    assert leftovers == [] and not os.path.exists(os.path.join(out, "best.safetensors"))
    resumed = run_script("main.py", *RUN, "-o", f"train.output_dir={out}", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_records(whole, read_records(out))


def _started_then_sleep(started):
    started.set()  # the fork's handlers have run by now
    time.sleep(30)


def test_a_forked_worker_does_not_keep_the_run_folder_locked(tmp_path):
    """A loader worker that outlives an interrupted run must not lock the folder against the
    same process resuming it (a notebook's next cell)."""
    import multiprocessing

    from utils.run_folder import RunFolder

    folder = RunFolder(str(tmp_path))
    folder.hold()
    context = multiprocessing.get_context("fork")
    started = context.Event()
    child = context.Process(target=_started_then_sleep, args=(started,))
    child.start()
    try:
        assert started.wait(30)
        folder.release()
        again = RunFolder(str(tmp_path))
        again.hold(resume=True)  # the child still runs
        with pytest.raises(UserError, match="is in use by another run"):
            RunFolder(str(tmp_path)).hold(resume=True)
        again.release()
    finally:
        child.kill()
        child.join()


@pytest.mark.slow
def test_a_stop_after_the_last_epoch_is_not_an_interruption(tmp_path, monkeypatch, capsys):
    from main import train
    from training.config import load_config
    from training.run import Run

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


@pytest.mark.slow
def test_sighup_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    out = str(tmp_path / "hup")
    proc = subprocess.Popen([sys.executable, "main.py", *DEMO_CLI, "-o", f"train.output_dir={out}",
                             "-o", "data.train_subset=256", "-o", "train.progress=off"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("stage 0 epoch 1/"):
            proc.send_signal(signal.SIGHUP)
            break
    _, err = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 128 + signal.SIGHUP, err[-2000:]
    line = [text for text in err.splitlines() if text.startswith("interrupted: ")][0]
    assert "SIGHUP at stage 0" in line and "--resume" in line and "Traceback" not in err
    assert os.path.isfile(os.path.join(out, "last", "state.json"))


@pytest.mark.slow
def test_a_resume_stopped_before_its_first_step_keeps_every_optimizer_moment(tmp_path,
                                                                             monkeypatch):
    """Stopped during a validation, resumed, and stopped again during the validation the
    resume starts with (before it takes a step): that checkpoint holds every optimizer
    tensor the one before held (Paddle 2.6's state_dict() alone returned none of them, and
    the next resume restarted AdamW from zero)."""
    from conftest import small_demo_config, stop_at_evaluation

    cfg = small_demo_config(str(tmp_path / "run"))
    first = stop_at_evaluation(cfg, 1, monkeypatch)
    optimizer_file = os.path.join(str(tmp_path / "run"), "last", "optimizer.safetensors")
    before = load_tensors(optimizer_file)[0]
    second = stop_at_evaluation(cfg, 1, monkeypatch, resume=True)
    assert first == second and first["evaluating"]
    after = load_tensors(optimizer_file)[0]
    assert len(before) > 2 and sorted(after) == sorted(before)
    for key, value in before.items():
        assert np.array_equal(after[key], value), key


@pytest.mark.slow
def test_a_resume_reads_no_weights_it_started_from(trained, tmp_path):
    """A run started with --init-from FOLDER, killed, then FOLDER archived: RESUME.txt's
    command, pasted in another folder, continues it (a resume reads its checkpoint, not those
    weights). The fresh command with other start weights is not the finished run."""
    start, out = tmp_path / "start", tmp_path / "out"
    subprocess.run(["cp", "-r", trained, str(start)], check=True)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *SAVING_RUN_CLI,
                             "-o", f"train.output_dir={out}", "--init-from", str(start)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert kill_in_stage_1(proc, str(out)) is not None
    start.rename(tmp_path / "archived")
    comment, command = (out / "RESUME.txt").read_text(encoding="utf-8").splitlines()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    resumed = subprocess.run(["bash", "-c", command], cwd=str(elsewhere), capture_output=True,
                             text=True, timeout=HANG_S)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and "Traceback" not in resumed.stderr
    again = run_script("main.py", *SAVING_RUN_CLI, "-o", f"train.output_dir={out}",
                       "--init-from", str(tmp_path / "archived"))
    assert_one_error(again, f"train.output_dir {out} already holds a finished run")
