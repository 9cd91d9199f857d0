"""Speed paths on the CPU: fused attention against PPIM's, AMP's fallback, two data-parallel
ranks (gloo) through Paddle's launcher, and the throughput benchmark."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import paddle
import pytest
from conftest import (
    DEMO_BAND,
    ROOT,
    kill_in_stage_1,
    process_alive,
    read_records,
    run_script,
    tiny_model_config,
)

import models.attention as attention
from models.build import build_model

SMALL = ["-o", "data.train_subset=256", "-o", "data.val_subset=100"]


def _tiny(fused, attn_drop=0.0):
    paddle.seed(0)
    return build_model(tiny_model_config(drop_rate=0.0, attn_drop_rate=attn_drop,
                                         fused_attention=fused))


def test_fused_attention_matches_ppims_with_the_same_weights():
    plain, fused = _tiny("off"), _tiny("on")
    assert [type(b.attn).__name__ for b in fused.blocks] == ["FusedAttention"] * 2
    assert list(fused.state_dict()) == list(plain.state_dict())  # PPIM's names: weights load
    fused.set_state_dict(plain.state_dict())
    x = paddle.to_tensor(np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype("float32"))
    outputs = []
    for model in (plain, fused):
        model.train()  # dropout rates are 0: train mode is deterministic here
        out = model(x)
        out.sum().backward()
        outputs.append((out.numpy(), model.blocks[0].attn.qkv.weight.grad.numpy()))
    assert np.allclose(outputs[0][0], outputs[1][0], atol=1e-5)
    assert np.allclose(outputs[0][1], outputs[1][1], atol=1e-5)


def test_fused_attention_applies_the_layers_dropout_rate(monkeypatch):
    model, seen = _tiny("on", attn_drop=0.3), []
    real = attention.F.scaled_dot_product_attention

    def record(*args, **kwargs):
        seen.append((kwargs["dropout_p"], kwargs["training"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", record)
    x = paddle.zeros([2, 3, 32, 32])
    model.train()
    model(x)
    model.eval()
    model(x)
    assert seen == [(0.3, True)] * 2 + [(0.0, False)] * 2


def _probe_says(monkeypatch, reason):
    """Replace the kernel probe by a fixed outcome; return the probes it was asked for."""
    asked = []
    monkeypatch.setattr(attention, "probe_kernel", lambda *args: asked.append(args) or reason)
    return asked


def test_auto_fuses_only_on_a_gpu_with_amp_where_the_kernel_passes_its_probe(monkeypatch):
    asked = _probe_says(monkeypatch, None)
    assert "PPIM's" in attention.use_fused_attention(_tiny("off"), "auto", "cpu", "bf16", 17)
    assert "PPIM's" in attention.use_fused_attention(_tiny("off"), "auto", "gpu:0", "off", 17)
    assert asked == []  # nothing to probe: auto never fuses there
    model = _tiny("off")
    line = attention.use_fused_attention(model, "auto", "gpu:0", "fp16", 17)
    assert line == ("attention: 2 layers use paddle.nn.functional.scaled_dot_product_attention "
                    "in float16 (probed on gpu:0)")
    assert asked == [("gpu:0", "float16", 17, 2, 32, 0.0)]  # tokens, heads, head_dim, dropout
    assert [b.attn.kernel_dtypes for b in model.blocks] == [("float16",)] * 2


def test_a_failed_probe_keeps_ppims_attention_with_auto_and_is_an_error_with_on(monkeypatch,
                                                                                 capsys):
    from utils.errors import UserError

    reason = "RuntimeError: FlashAttention only supports Ampere GPUs or newer."
    _probe_says(monkeypatch, reason)
    model = _tiny("off")
    capsys.readouterr()
    line = attention.use_fused_attention(model, "auto", "gpu:0", "fp16", 17)
    assert line == "attention: PPIM's (the fused kernel failed its probe on gpu:0)"
    assert capsys.readouterr().out == (
        f"warning: model.fused_attention=auto: scaled_dot_product_attention fails on gpu:0 in "
        f"float16 ({reason}); using PPIM's attention\n")
    assert {type(b.attn).__name__ for b in model.blocks} == {"Attention"}
    with pytest.raises(UserError, match="model.fused_attention=on, but scaled_dot_product_"
                                        "attention fails on gpu:0 in bfloat16 .RuntimeError"):
        attention.use_fused_attention(_tiny("off"), "on", "gpu:0", "bf16", 17)


def test_a_float32_call_of_a_layer_fused_for_float16_takes_ppims_path(monkeypatch):
    plain = _tiny("off")
    _probe_says(monkeypatch, None)
    fused = _tiny("off")
    attention.use_fused_attention(fused, "auto", "gpu:0", "fp16", 17)
    fused.set_state_dict(plain.state_dict())

    def kernel(*args, **kwargs):
        raise AssertionError("the fused kernel was called with float32 inputs")

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", kernel)
    x = paddle.to_tensor(np.random.default_rng(1).normal(size=(3, 3, 32, 32)).astype("float32"))
    results = []
    for model in (plain, fused):
        model.train()
        out = model(x)
        out.sum().backward()
        results.append((out.numpy(), model.blocks[1].attn.qkv.weight.grad.numpy()))
    assert np.array_equal(results[0][0], results[1][0])  # PPIM's computation, exactly
    assert np.array_equal(results[0][1], results[1][1])


def test_the_real_probe_runs_here_and_leaves_the_random_stream_alone():
    paddle.seed(3)
    expected = paddle.rand([4]).numpy()
    paddle.seed(3)
    assert attention.probe_kernel.__wrapped__("cpu", "float32", 17, 2, 32, 0.1) is None
    assert np.array_equal(paddle.rand([4]).numpy(), expected)
    assert attention.probe_kernel("cpu", "float64x", 17, 2, 32, 0.0) is not None  # a bad dtype


def test_amp_without_support_says_so_once_and_trains_in_float32(tmp_path):
    out = str(tmp_path / "amp")
    proc = run_script("main.py", "-c", "configs/demo.yaml", *SMALL, "-o", "stages.0.epochs=1",
                      "-o", "stages.1.epochs=1", "-o", f"train.output_dir={out}",
                      "-o", "train.amp=bf16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: train.amp=bf16 is not available on cpu (Paddle applies "
                        "bfloat16 AMP on GPUs that support it); using float32"]
    proc = run_script("val.py", "-c", "configs/demo.yaml", "-o", f"train.output_dir={out}",
                      "-o", "train.amp=fp16")
    assert proc.returncode == 0 and "warning: train.amp=fp16 is not available" in proc.stdout
    plan = run_script("main.py", "-c", "configs/rdrop_deit_b_384_cifar100.yaml", "--dry-run")
    assert "AMP fp16 (O1); fused attention auto" in plan.stdout


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


def test_two_cpu_ranks_train_the_demo_to_its_accuracy(tmp_path):
    out, logs = str(tmp_path / "dp"), str(tmp_path / "logs")
    assert _launch(out, log_dir=logs).wait(timeout=900) == 0, _log_tail(logs)
    records = read_records(out)
    assert len(records) == 35  # rank 0 alone writes: one line per epoch
    rank0, rank1 = (_epoch_lines(os.path.join(logs, f"workerlog.{r}")) for r in (0, 1))
    assert len(rank0) == 35 and rank1 == []  # rank 0 reports for all
    assert _test_top1(out) >= DEMO_BAND


def test_two_local_nodes_train_the_demo_to_its_accuracy(tmp_path):
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        master = f"127.0.0.1:{probe.getsockname()[1]}"
    out = str(tmp_path / "nodes")
    nodes = [_launch(out, log_dir=str(tmp_path / f"node{i}"), nodes=(i, master)) for i in (0, 1)]
    assert [node.wait(timeout=900) for node in nodes] == [0, 0], _log_tail(str(tmp_path / "node0"))
    assert len(read_records(out)) == 35
    assert _test_top1(out) >= DEMO_BAND


SHORT = [*SMALL, "-o", "stages.0.epochs=1", "-o", "stages.1.epochs=2",
         "-o", "train.save_every_steps=2", "-o", "train.ema.enabled=true"]


@pytest.fixture(scope="module")
def two_rank_short_run(tmp_path_factory):
    """The short demo on two CPU ranks: its output folder."""
    folder = tmp_path_factory.mktemp("two-ranks")
    whole, logs = str(folder / "whole"), str(folder / "logs")
    assert _launch(whole, *SHORT, log_dir=logs).wait(timeout=600) == 0, _log_tail(logs)
    return whole


def test_two_ranks_killed_and_resumed_end_like_an_uninterrupted_run(two_rank_short_run,
                                                                    tmp_path):
    whole, killed = two_rank_short_run, str(tmp_path / "killed")
    proc = _launch(killed, *SHORT, log_dir=str(tmp_path / "l2"), new_session=True)
    kill_in_stage_1(proc, killed, group=True)
    assert len(read_records(killed)) < 3
    assert _launch(killed, *SHORT, "--resume", log_dir=str(tmp_path / "l3")).wait(timeout=600) \
        == 0, _log_tail(str(tmp_path / "l3"))
    _assert_close_records(whole, killed, abs_tol=1e-12)


def _assert_close_records(expected_run, run, abs_tol):
    """Both runs hold the same 3 records (``images_per_s`` aside) within float tolerance."""
    expected, got = read_records(expected_run), read_records(run)
    assert len(got) == len(expected) == 3
    for want, have in zip(expected, got):
        for key in want:
            if key != "images_per_s":
                assert have[key] == pytest.approx(want[key], rel=1e-5, abs=abs_tol), key


def test_two_ranks_with_recompute_train_to_the_same_weights(two_rank_short_run, tmp_path):
    """Recompute inside DataParallel (Paddle's re-entrant form crashed its reducer at the
    first backward): the same dropout masks, the same records and weights."""
    out, logs = str(tmp_path / "recompute"), str(tmp_path / "logs")
    assert _launch(out, *SHORT, "-o", "model.recompute=true", log_dir=logs).wait(
        timeout=600) == 0, _log_tail(logs)
    with open(os.path.join(logs, "workerlog.0"), encoding="utf-8") as handle:
        assert "stage check: stages 0-1 each ran one optimizer step" in handle.read()
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
    out = tmp_path_factory.mktemp("dp-grads")
    logs = str(out / "logs")
    command = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
               "--log_dir", logs, os.path.join("tests", "dp_recompute_grads.py"), str(out)]
    code = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, timeout=600).returncode
    assert code == 0, _log_tail(logs)
    return {name[:-4]: dict(np.load(out / name)) for name in os.listdir(out)
            if name.endswith(".npz")}


def _relative_error(got, want):
    return max(np.abs(got[k] - want[k]).max() / max(np.abs(want[k]).max(), 1e-12) for k in want)


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
    from data.preprocess import DevicePreprocess
    from losses import RDropLoss
    from training.engine import train_step

    train_step(model, RDropLoss(alpha=1.0), DevicePreprocess(32), paddle.to_tensor(images),
               paddle.to_tensor(labels))
    full = {path: param.grad.numpy() for path, param in model.named_parameters()}
    for recompute in (0, 1):
        got = two_rank_gradients[f"rc{recompute}_acc{accum}_drop0.0"]
        assert got.keys() == full.keys()
        assert _relative_error(got, full) <= 1e-5, (recompute, accum)


@pytest.mark.parametrize("accum", [1, 2])
def test_recompute_on_two_ranks_keeps_the_dropout_masks(two_rank_gradients, accum):
    without = two_rank_gradients[f"rc0_acc{accum}_drop0.3"]
    with_recompute = two_rank_gradients[f"rc1_acc{accum}_drop0.3"]
    assert _relative_error(with_recompute, without) <= 1e-5
    # Dropout is on: these are not the gradients without it.
    assert _relative_error(without, two_rank_gradients[f"rc0_acc{accum}_drop0.0"]) > 1e-2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_ranks_die_with_a_launcher_killed_by_sigkill(tmp_path):
    out = tmp_path / "run"
    proc = _launch(str(out), *SHORT, log_dir=str(tmp_path / "log"), new_session=True)
    # Killed in training, long after the launcher's rendezvous store was last used: the ranks
    # run in sessions of their own, so only the kernel's parent-death signal stops them.
    assert kill_in_stage_1(proc, str(out), group=True) is not None
    records = (out / "metrics.jsonl").read_text()
    pid = json.loads((out / "run.lock").read_text())["pid"]  # rank 0's
    deadline = time.time() + 10
    while process_alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not process_alive(pid)
    # Without the signal the orphans went on for seconds, finishing this short run.
    assert (out / "metrics.jsonl").read_text() == records


def test_throughput_quick_prints_one_json_line():
    proc = run_script("bench/throughput.py", "--quick", "--steps", "2", "--warmup", "1",
                      timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert {"images_per_s", "seed_loop_images_per_s", "speedup_over_seed_loop",
            "device"} <= set(result)
    assert result["device"] == "cpu" and result["image_size"] == 64 and result["mfu"] is None
    assert result["speedup_over_seed_loop"] == pytest.approx(
        result["images_per_s"] / result["seed_loop_images_per_s"], rel=0.01)


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_precision_weights_save_average_and_load_as_float32(tmp_path, half):
    """What AMP O2 leaves in the model (half-precision weights) goes through checkpoints,
    EMA and weight swaps; on a CPU the weights are cast by hand (Paddle runs O2 on GPUs)."""
    from training.averaging import EMA, weights_in
    from utils.io.tensor_io import load_state, load_tensors, save_tensors

    model = _tiny("off")
    reference = {key: value.numpy().copy() for key, value in model.state_dict().items()}
    model.to(dtype=half)
    ema = EMA(model, decay=0.5, warmup=False)
    ema.update(model)
    assert all(str(value.dtype).endswith("float32") for value in ema.state_dict().values())
    path = str(tmp_path / "half.safetensors")
    save_tensors(path, model.state_dict())
    saved, _ = load_tensors(path)
    assert all(array.dtype == np.float32 for array in saved.values())
    for key, array in saved.items():  # the half-precision values, exactly, as float32
        assert np.allclose(array, reference[key], rtol=1e-2, atol=1e-2), key
    fresh = _tiny("off")
    fresh.to(dtype=half)
    load_state(fresh, saved)
    assert fresh.blocks[0].attn.qkv.weight.dtype == model.blocks[0].attn.qkv.weight.dtype
    assert np.array_equal(fresh.head.weight.astype("float32").numpy(), saved["head.weight"])
    with weights_in(fresh, ema.state_dict()):
        swapped = fresh.head.weight.astype("float32").numpy().copy()
    assert np.allclose(swapped, ema.state_dict()["head.weight"].numpy(), atol=1e-2)
    assert np.array_equal(fresh.head.weight.astype("float32").numpy(), saved["head.weight"])


def test_o2_on_a_cpu_falls_back_and_keeps_float32_weights(capsys):
    from training.amp import Precision

    precision = Precision("bf16", "cpu", "O2")
    model = precision.prepare(_tiny("off"))
    assert "warning: train.amp=bf16 is not available on cpu" in capsys.readouterr().out
    assert not precision.half_weights and model.head.weight.dtype == paddle.float32
