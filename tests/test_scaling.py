"""Several ranks on the CPU: two data-parallel ranks (gloo) and two local nodes through
Paddle's launcher, killed and resumed, with recompute, and ranks that die with their
launcher."""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import paddle
import pytest
from conftest import (
    DEMO_BAND,
    HANG_S,
    ROOT,
    kill_in_stage_1,
    process_alive,
    read_records,
    run_script,
    split_resume_command,
    tiny_model_config,
)

from models.build import build_model
from models.recompute import hooks_keep_random_state

SMALL = ["-o", "data.train_subset=256", "-o", "data.val_subset=100"]


def _launch(out, *extra, log_dir, new_session=False, nodes=None):
    """``python -m paddle.distributed.launch --nproc_per_node 2 main.py`` on the demo, as it
    is (the same recipe as one process); ``nodes=(index, master)``: one of two one-rank
    "nodes" on this machine (``--nnodes 2 --master``)."""
    where = (["--nproc_per_node", "2"] if nodes is None else
             ["--nnodes", "2", "--master", nodes[1], "--rank", str(nodes[0]),
              "--nproc_per_node", "1"])
    command = [sys.executable, "-m", "paddle.distributed.launch", *where, "--log_dir", log_dir,
               "main.py", "-c", "configs/demo.yaml", "-o", f"train.output_dir={out}", *extra]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=new_session)


def _log_tail(folder):
    return "".join(open(os.path.join(folder, name), encoding="utf-8", errors="replace")
                   .read()[-1500:] for name in sorted(os.listdir(folder))
                   if name.startswith("workerlog"))


def _test_top1(out):
    proc = run_script("val.py", "-c", "configs/demo.yaml", "-o", f"train.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(proc.stdout.strip().splitlines()[-1].split()[0].split("=")[1])


def _epoch_lines(log):
    with open(log, encoding="utf-8", errors="replace") as handle:
        return [line.split("|")[0] for line in handle.read().replace("\r", "\n").splitlines()
                if line.startswith("stage ") and " val top1 " in line]


@pytest.fixture(scope="module")
def two_rank_demo(tmp_path_factory):
    """The demo as it is (no ``-o``) on two CPU ranks: its output folder and launcher logs."""
    folder = tmp_path_factory.mktemp("two-rank-demo")
    out, logs = str(folder / "dp"), str(folder / "logs")
    assert _launch(out, log_dir=logs).wait(timeout=HANG_S) == 0, _log_tail(logs)
    return out, logs


@pytest.mark.slow
def test_two_cpu_ranks_train_the_demo_to_its_accuracy(two_rank_demo):
    out, logs = two_rank_demo
    records = read_records(out)
    assert len(records) == 35  # rank 0 alone writes: one line per epoch
    rank0, rank1 = (_epoch_lines(os.path.join(logs, f"workerlog.{r}")) for r in (0, 1))
    assert len(rank0) == 35 and rank1 == []  # rank 0 reports for all
    assert _test_top1(out) >= DEMO_BAND


@pytest.mark.slow
def test_two_local_nodes_follow_the_two_rank_trajectory(two_rank_demo, tmp_path):
    """Two one-rank "nodes" (``--nnodes 2``) train what two ranks on one node train: the
    same records epoch for epoch. Three epochs of the demo's first stage are enough to show
    it (a shorter run leaves them unchanged: the stage's LR is constant after its warmup,
    and the data order and dropout derive from the seed and the epoch); the two-rank run
    above carries the trajectory to the accuracy band."""
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        master = f"127.0.0.1:{probe.getsockname()[1]}"
    out, epochs = str(tmp_path / "nodes"), 3
    short = ["-o", f"stages.0.epochs={epochs}", "-o", "stages.1.epochs=1"]
    nodes = [_launch(out, *short, log_dir=str(tmp_path / f"node{i}"), nodes=(i, master))
             for i in (0, 1)]
    assert [node.wait(timeout=HANG_S) for node in nodes] == [0, 0], _log_tail(str(tmp_path / "node0"))
    got = read_records(out)
    assert len(got) == epochs + 1
    for want, have in zip(read_records(two_rank_demo[0])[:epochs], got):
        assert want.keys() == have.keys()
        for key in want:
            if key != "images_per_s":
                assert have[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key
    assert _test_top1(out) > 0.1  # val.py reads the nodes' run (chance is 0.1)


SHORT = [*SMALL, "-o", "stages.0.epochs=1", "-o", "stages.1.epochs=2",
         "-o", "train.save_every_steps=2", "-o", "train.ema.enabled=true"]


@pytest.fixture(scope="module")
def two_rank_short_run(tmp_path_factory):
    """The short demo on two CPU ranks: its output folder."""
    folder = tmp_path_factory.mktemp("two-ranks")
    whole, logs = str(folder / "whole"), str(folder / "logs")
    assert _launch(whole, *SHORT, log_dir=logs).wait(timeout=HANG_S) == 0, _log_tail(logs)
    return whole


@pytest.mark.slow
def test_two_ranks_killed_and_resumed_end_like_an_uninterrupted_run(two_rank_short_run,
                                                                    tmp_path):
    whole, killed = two_rank_short_run, str(tmp_path / "killed")
    proc = _launch(killed, *SHORT, log_dir=str(tmp_path / "l2"), new_session=True)
    kill_in_stage_1(proc, killed, group=True)
    assert len(read_records(killed)) < 3
    assert _launch(killed, *SHORT, "--resume", log_dir=str(tmp_path / "l3")).wait(timeout=HANG_S) \
        == 0, _log_tail(str(tmp_path / "l3"))
    _assert_close_records(whole, killed, abs_tol=1e-12)


@pytest.mark.slow
def test_sigterm_to_the_launcher_saves_every_rank_and_the_printed_command_resumes(
        two_rank_short_run, tmp_path):
    """``kill <launcher>`` (a scheduler's stop): the launcher sends SIGTERM to each rank's
    process group three times, 0.2 s apart; the ranks and their loader workers outlive the
    repeats, stop after the step together, save, and print the launcher's own command."""
    whole, out, logs = two_rank_short_run, str(tmp_path / "term"), str(tmp_path / "logs")
    proc = _launch(out, *SHORT, "-o", "data.num_workers=2", log_dir=logs)
    saved = kill_in_stage_1(proc, out, signum=signal.SIGTERM)
    assert proc.returncode == signal.SIGTERM
    with open(os.path.join(out, "last", "state.json"), encoding="utf-8") as handle:
        stopped = json.load(handle)["position"]
    assert (stopped["epoch"], stopped["micro"]) > (saved["epoch"], saved["micro"])
    ranks = [open(os.path.join(logs, f"workerlog.{r}"), encoding="utf-8",
                  errors="replace").read() for r in (0, 1)]
    for text in ranks:
        assert "Traceback" not in text and "Error" not in text, text[-2000:]
        assert "interrupted: SIGTERM at stage 1" in text
    line = next(text for text in ranks[0].splitlines() if text.startswith("interrupted: "))
    folder, command = split_resume_command(line.split("continue with: ", 1)[1])
    assert folder == ROOT and command[:5] == [sys.executable, "-m", "paddle.distributed.launch",
                                              "--nproc_per_node", "2"]
    assert command[command.index("--log_dir") + 2] == os.path.join(ROOT, "main.py")
    command[command.index("--log_dir") + 1] = str(tmp_path / "resumed-logs")
    resumed = subprocess.run(command, cwd=folder,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=HANG_S)
    assert resumed.returncode == 0, _log_tail(str(tmp_path / "resumed-logs"))
    _assert_close_records(whole, out, abs_tol=1e-12)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_a_rank_under_a_wrapper_script_saves_when_the_launcher_ends(tmp_path):
    """paddle.distributed.launch running a shell script that runs main.py: SIGHUP ends the
    launcher, the script (in a session of its own) lives on, and each rank, which watches
    the launcher, stops after its step and saves."""
    out, logs = tmp_path / "wrapped", str(tmp_path / "logs")
    wrapper = tmp_path / "train.sh"
    wrapper.write_text(f"#!/bin/sh\ncd {shlex.quote(ROOT)}\n"
                       f"{shlex.quote(sys.executable)} main.py \"$@\"\n")
    wrapper.chmod(0o755)
    command = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
               "--log_dir", logs, str(wrapper), "-c", "configs/demo.yaml",
               "-o", f"train.output_dir={out}", *SHORT]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    saved = kill_in_stage_1(proc, str(out), signum=signal.SIGHUP)
    assert saved is not None and proc.returncode == -signal.SIGHUP
    _ranks_end(out)
    stopped = json.loads((out / "last" / "state.json").read_text())["position"]
    assert (stopped["epoch"], stopped["micro"]) > (saved["epoch"], saved["micro"])
    text = open(os.path.join(logs, "workerlog.0"), encoding="utf-8", errors="replace").read()
    assert "interrupted: SIGTERM at stage 1" in text and "Traceback" not in text, text[-2000:]


@pytest.mark.slow
def test_a_stop_in_a_validation_ends_it_on_every_rank_within_a_few_batches(tmp_path):
    """SIGTERM to rank 0 alone at the second batch of a validation of 50 batches a rank: the
    ranks agree within a few batches (not at the pass's end, which on GPUs could outlast the
    launcher's grace before its SIGKILL), save a checkpoint that validates again on resume,
    and --resume finishes."""
    from training.engine import STOP_AGREEMENT_BATCHES

    out, logs = tmp_path / "out", str(tmp_path / "logs")
    options = ["-c", "configs/demo.yaml", "-o", f"train.output_dir={out}", *SMALL,
               "-o", "data.eval_batch_size=1", "-o", "stages.0.epochs=1",
               "-o", "stages.1.epochs=1"]
    command = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
               "--log_dir", logs, os.path.join("tests", "stop_in_validation_ranks.py"),
               *options]
    subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=HANG_S)
    texts = [open(os.path.join(logs, f"workerlog.{r}"), encoding="utf-8",
                  errors="replace").read() for r in (0, 1)]
    for text in texts:
        assert "interrupted: SIGTERM" in text and "Traceback" not in text, text[-2000:]
        counted = int(re.findall(r"validation batches (\d+)", text)[-1])
        # 50 batches a rank; the ranks agree before batches 0, 4, 8...: the stop that came
        # during batch 1 ends the pass before batch 4 is evaluated (5 taken from the loader)
        assert counted == 1 + STOP_AGREEMENT_BATCHES, text[-2000:]
    position = json.loads((out / "last" / "state.json").read_text())["position"]
    assert position["evaluating"] and position["stage"] == 0
    resumed = _launch(str(out), *SMALL, "-o", "data.eval_batch_size=1", "-o",
                      "stages.0.epochs=1", "-o", "stages.1.epochs=1", "--resume",
                      log_dir=str(tmp_path / "resumed-logs"))
    assert resumed.wait(timeout=HANG_S) == 0, _log_tail(str(tmp_path / "resumed-logs"))
    assert json.loads((out / "last" / "state.json").read_text())["tested"]


@pytest.mark.slow
def test_preflight_ranks_halve_a_micro_batch_together(tmp_path):
    """Rank 1 alone runs out of memory at 16 images a micro-batch (tests/preflight_ranks.py):
    both ranks try it without exchanging gradients, decide together, and report the same
    micro-batch of 8 and the same one line."""
    logs = str(tmp_path / "logs")
    command = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
               "--log_dir", logs, os.path.join("tests", "preflight_ranks.py"),
               "-c", "configs/demo.yaml", "-o", f"train.output_dir={tmp_path / 'out'}",
               "--preflight", "--json"]
    subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=HANG_S)
    for r in (0, 1):
        with open(os.path.join(logs, f"workerlog.{r}"), encoding="utf-8") as handle:
            # Paddle's C++ log lines ("I1202 16:30:10.95 ... tcp_store.cc:289] ...") come from
            # its threads, on Paddle 2.6 even after the process's own last line.
            lines = [line for line in handle.read().strip().splitlines()
                     if not re.match(r"[IWE]\d{4} \d", line)]
        assert lines[-1] == "exit 2", lines[-10:]
        assert lines[-2] == ("error: a micro-batch of 16 images (stage 0) does not fit in "
                             "memory on cpu; 8 does: -o train.accum_steps=2 keeps the 32 "
                             "images per step, or try -o model.recompute=true")
        report = json.loads(lines[-3])
        assert [(s["micro_batch"], s["accum_steps"]) for s in report["stages"]] == [(8, 2),
                                                                                    (8, 2)]


def _assert_close_records(expected_run, run, abs_tol):
    """Both runs hold the same 3 records (``images_per_s`` aside) within float tolerance."""
    expected, got = read_records(expected_run), read_records(run)
    assert len(got) == len(expected) == 3
    for want, have in zip(expected, got):
        for key in want:
            if key != "images_per_s":
                assert have[key] == pytest.approx(want[key], rel=1e-5, abs=abs_tol), key


@pytest.mark.slow
def test_two_ranks_with_recompute_train_to_the_same_weights(two_rank_short_run, tmp_path):
    """Recompute inside DataParallel (Paddle's re-entrant form crashed its reducer at the
    first backward): the same dropout masks, the same records and weights."""
    out, logs = str(tmp_path / "recompute"), str(tmp_path / "logs")
    code = _launch(out, *SHORT, "-o", "model.recompute=true", log_dir=logs).wait(timeout=HANG_S)
    with open(os.path.join(logs, "workerlog.0"), encoding="utf-8") as handle:
        log = handle.read()
    if not hooks_keep_random_state():  # Paddle 2.6 on a CPU: refused before the first step
        # Each rank refuses on its own (exit 2); the launcher reports the first end it sees:
        # a rank's 2, or, under load, the SIGTERM it sent the other rank on it (-15: 241).
        assert code in (2, 256 - signal.SIGTERM), _log_tail(logs)
        assert "on several CPU ranks recompute needs Paddle 3" in log
        return
    assert code == 0, _log_tail(logs)
    assert "stage check: stages 0-1 each ran one optimizer step" in log
    _assert_close_records(two_rank_short_run, out, abs_tol=1e-7)
    from utils.io.tensor_io import load_tensors

    for kind in ("raw", "ema"):
        a = load_tensors(os.path.join(two_rank_short_run, "last", f"{kind}.safetensors"))[0]
        b = load_tensors(os.path.join(out, "last", f"{kind}.safetensors"))[0]
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.fixture(scope="module")
def two_rank_gradients(tmp_path_factory):
    """tests/dp_recompute_grads.py on two CPU ranks: its gradients by case."""
    if not hooks_keep_random_state():
        pytest.skip("Paddle 2.6 on a CPU: its DataParallel-safe recompute cannot keep "
                    "dropout's random state; a run is refused (the test above)")
    out = tmp_path_factory.mktemp("dp-grads")
    logs = str(out / "logs")
    command = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
               "--log_dir", logs, os.path.join("tests", "dp_recompute_grads.py"), str(out)]
    code = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, timeout=HANG_S).returncode
    assert code == 0, _log_tail(logs)
    return {name[:-4]: dict(np.load(out / name)) for name in os.listdir(out)
            if name.endswith(".npz")}


def _relative_error(got, want):
    return max(np.abs(got[k] - want[k]).max() / max(np.abs(want[k]).max(), 1e-12) for k in want)


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_recompute_on_two_ranks_gives_the_full_batch_gradient_of_one_process(
        two_rank_gradients, accum):
    """Two ranks, recompute, one or two micro-batches each (the first under no_sync): the
    averaged gradient is that of the 8 images in one process without recompute."""
    import dp_recompute_grads as script

    images, labels = script.batch()
    paddle.seed(0)
    model = build_model(tiny_model_config(drop_rate=0.0, attn_drop_rate=0.0,
                                          drop_path_rate=0.0))
    model.train()
    from losses import RDropLoss
    from training.engine import train_step
    from training.stage import Stage

    train_step(Stage.of_parts(model, RDropLoss(alpha=1.0)), paddle.to_tensor(images),
               paddle.to_tensor(labels))
    full = {path: param.grad.numpy() for path, param in model.named_parameters()}
    for recompute in (0, 1):
        got = two_rank_gradients[f"rc{recompute}_acc{accum}_drop0.0"]
        assert got.keys() == full.keys()
        assert _relative_error(got, full) <= 1e-5, (recompute, accum)


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_recompute_on_two_ranks_keeps_the_dropout_masks(two_rank_gradients, accum):
    without = two_rank_gradients[f"rc0_acc{accum}_drop0.3"]
    with_recompute = two_rank_gradients[f"rc1_acc{accum}_drop0.3"]
    assert _relative_error(with_recompute, without) <= 1e-5
    # Dropout is on: these are not the gradients without it.
    assert _relative_error(without, two_rank_gradients[f"rc0_acc{accum}_drop0.0"]) > 1e-2


def _ranks_end(out):
    """Wait (up to a minute) for the ranks of the run in ``out`` to end; rank 0's pid."""
    pid = json.loads((out / "run.lock").read_text())["pid"]  # rank 0's
    deadline = time.time() + 60
    while process_alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not process_alive(pid)
    return pid


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_ranks_stop_and_save_with_a_launcher_killed_by_sigkill(tmp_path):
    out = tmp_path / "run"
    proc = _launch(str(out), *SHORT, log_dir=str(tmp_path / "log"), new_session=True)
    # Killed in training, long after the launcher's rendezvous store was last used: the ranks
    # run in sessions of their own, so only the kernel's parent-death signal reaches them.
    saved = kill_in_stage_1(proc, str(out), group=True)
    assert saved is not None
    _ranks_end(out)
    # Without the signal the orphans went on, finishing this short run; with SIGKILL as
    # that signal they ended without a checkpoint. They stop after the step and save.
    stopped = json.loads((out / "last" / "state.json").read_text())["position"]
    assert stopped["stage"] == 1 and not json.loads(
        (out / "last" / "state.json").read_text()).get("tested")
    assert (stopped["epoch"], stopped["micro"]) > (saved["epoch"], saved["micro"])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_sighup_to_the_launcher_saves_every_rank_and_resume_finishes(two_rank_short_run,
                                                                     tmp_path):
    """A closed terminal without nohup: SIGHUP ends the launcher at once, telling its ranks
    (in sessions of their own) nothing; the kernel's parent-death signal is a SIGTERM, so each
    rank (loader workers on) stops after its step and saves, and --resume finishes the run."""
    whole, out, logs = two_rank_short_run, tmp_path / "hup", str(tmp_path / "logs")
    proc = _launch(str(out), *SHORT, "-o", "data.num_workers=2", log_dir=logs)
    saved = kill_in_stage_1(proc, str(out), signum=signal.SIGHUP)
    assert proc.returncode == -signal.SIGHUP  # the launcher itself: killed by the signal
    _ranks_end(out)
    stopped = json.loads((out / "last" / "state.json").read_text())["position"]
    assert (stopped["epoch"], stopped["micro"]) > (saved["epoch"], saved["micro"])
    for r in (0, 1):
        text = open(os.path.join(logs, f"workerlog.{r}"), encoding="utf-8",
                    errors="replace").read()
        assert "Traceback" not in text and "Error" not in text, text[-2000:]
        assert "interrupted: SIGTERM at stage 1" in text, text[-2000:]
    resumed = _launch(str(out), *SHORT, "--resume", log_dir=str(tmp_path / "resumed-logs"))
    assert resumed.wait(timeout=HANG_S) == 0, _log_tail(str(tmp_path / "resumed-logs"))
    _assert_close_records(whole, out, abs_tol=1e-12)
