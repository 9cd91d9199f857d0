"""A user's first hour: preflight, the held-out validation split and the final test, the
batch of a step whatever the ranks, activation recompute, and the rough edges of a first run
(VisualDL across a resume, a finished run resumed, numbering, offline downloads, progress
in a log file)."""

import json
import os
import re

import numpy as np
import paddle
import pytest
from conftest import (
    DEMO_CLI,
    assert_one_error,
    final_tests,
    read_records,
    run_script,
    small_demo_config,
    tiny_model_config,
)

from data.batching import micro_batch
from data.dataset import holdout_indices
from data.digits import load_digits
from data.preprocess import DevicePreprocess
from losses import RDropLoss
from models.build import build_model
from training import engine
from training.optim import build_schedule
from main import train
from utils.config import load_config
from utils.errors import UserError

# 1. Preflight -------------------------------------------------------------------------------

def test_preflight_measures_the_demo_in_one_json_line():
    proc = run_script("main.py", *DEMO_CLI, "--preflight", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("step_s", "train_images_per_s", "peak_memory_bytes", "projected_epoch_s",
                "projected_total_s", "eval_images_per_s", "checkpoint_bytes", "disk_bytes"):
        assert report[key] > 0, key
    assert report["fits"] and report["device"] == "cpu" and report["precision"] == "float32"
    assert [s["stage"] for s in report["stages"]] == [0, 1]
    assert all(s["micro_batch"] == 32 and s["accum_steps"] == 1 and s["steps_per_epoch"] == 37
               for s in report["stages"])  # 1197 train digits / 32
    assert report["disk_bytes"] > report["checkpoint_bytes"]
    assert report["projected_total_s"] > 35 * min(s["projected_epoch_s"] for s in report["stages"])
    table = run_script("main.py", *DEMO_CLI, "--preflight", timeout=300)
    assert table.returncode == 0 and "projected: the whole recipe" in table.stdout


def test_preflight_halves_a_micro_batch_that_does_not_fit(monkeypatch, capsys):
    import main

    real = engine.train_step

    def small_memory(stage, images, *args):
        if images.shape[0] > 8:
            raise MemoryError("Out of memory error on GPU 0 (simulated)")
        return real(stage, images, *args)

    monkeypatch.setattr(engine, "train_step", small_memory)
    cfg = load_config("configs/demo.yaml", ["stages.1.epochs=1"])
    with pytest.raises(UserError, match=r"a micro-batch of 32 images \(stage 0\) does not fit in "
                                        r"memory on cpu; 8 does: -o train.accum_steps=4 keeps "
                                        r"the 32 images per step, or try -o model.recompute=true"):
        main.run_preflight(cfg, as_json=True)
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(s["micro_batch"], s["accum_steps"]) for s in report["stages"]] == [(8, 4), (8, 4)]


def test_out_of_memory_in_a_run_is_one_line_after_a_safe_checkpoint(tmp_path, monkeypatch):
    real, calls = engine.train_step, []

    def runs_out(*args):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("ResourceExhaustedError: Out of memory error on GPU 0")
        return real(*args)

    monkeypatch.setattr(engine, "train_step", runs_out)
    out = str(tmp_path / "run")
    with pytest.raises(UserError, match=r"out of memory at stage 0 epoch 1/1, micro-batch 5 of "
                                        r"8; the last checkpoint \(.*/last\) is safe.*--preflight.*"
                                        r"train.accum_steps \(now 1\) or set model.recompute"):
        # The stage check's trial steps would call train_step first: this is about the run.
        train(small_demo_config(out, "train.save_every_steps=2", "train.check_stages=false"))
    from utils.checkpoint import find_last, load_last

    state, _ = load_last(find_last(out))
    assert state["position"]["micro"] == 4


# 2. The held-out validation split and the final test ---------------------------------------

def test_holdout_is_stratified_seeded_and_disjoint():
    labels = np.repeat(np.arange(100), 500)  # CIFAR-100's training split
    train, held = holdout_indices(labels, 5000, seed=(42, 2))
    assert len(held) == 5000 and np.all(np.bincount(labels[held]) == 50)
    assert len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == len(labels)
    again, _ = holdout_indices(labels, 5000, seed=(42, 2))
    assert np.array_equal(train, again)
    other = holdout_indices(labels, 5000, seed=(43, 2))[1]
    assert not np.array_equal(held, other)
    uneven = np.array([0] * 7 + [1] * 2 + [2])  # quotas 3.5, 1, 0.5 of 5: largest remainders
    assert np.bincount(uneven[holdout_indices(uneven, 5, 0)[1]], minlength=3).tolist() == [4, 1, 0]
    with pytest.raises(UserError, match=r"data.val_split=10 leaves no training image: the "
                       r"training split has 10, so hold out at most 9 \(or 0 to validate on"):
        holdout_indices(uneven, 10, 0)


def test_validation_comes_from_held_out_images_and_the_test_split_is_used_once(tmp_path):
    out = str(tmp_path / "run")
    best = train(small_demo_config(out, "data.val_subset=null"))
    assert all(r["val_top1"] is not None for r in read_records(out))
    assert best["val_num_samples"] == 240 and best["selected_on"] == "val"
    tests = final_tests(out)
    assert set(tests) == {"best", "last"} and tests["best"]["num_samples"] == 360
    with open(os.path.join(out, "best.json"), encoding="utf-8") as handle:
        saved = json.load(handle)
    assert saved["test_top1"] == tests["best"]["test_top1"]
    val = run_script("val.py", *DEMO_CLI, "-o", f"train.output_dir={out}", "--split", "val")
    assert val.returncode == 0 and val.stdout.strip().endswith("n=240 on the val split")
    test = run_script("val.py", *DEMO_CLI, "-o", f"train.output_dir={out}")
    top1 = float(re.search(r"top1=(\S+)", test.stdout)[1])
    assert top1 == pytest.approx(tests["best"]["test_top1"], abs=1e-4)


def test_the_old_protocol_says_its_best_is_chosen_on_the_test_split(tmp_path, capsys):
    out = str(tmp_path / "run")
    best = train(small_demo_config(out, "data.val_split=0"))
    assert best["selected_on"] == "test" and best["val_num_samples"] == 100
    assert "chosen on the test split (data.val_split: 0), so this number is biased upward" \
        in capsys.readouterr().out
    proc = run_script("val.py", *DEMO_CLI, "-o", "data.val_split=0", "-o", f"train.output_dir={out}")
    assert "chosen on the test split" in proc.stdout
    assert_one_error(run_script("val.py", *DEMO_CLI, "-o", "data.val_split=0", "-o",
                                f"train.output_dir={out}", "--split", "val"),
                     "this config holds out no validation images")


# 3. One recipe on any number of ranks -------------------------------------------------------

def test_the_batch_of_a_step_splits_over_ranks_and_micro_batches():
    assert micro_batch(24, 1, 1) == 24 and micro_batch(24, 2, 4) == 3
    with pytest.raises(UserError, match=r"data.batch_size=24 does not split into 5 rank\(s\) x "
                                        r"train.accum_steps=2 equal micro-batches; make it a "
                                        r"multiple of 10"):
        micro_batch(24, 2, 5)
    assert_one_error(run_script("main.py", *DEMO_CLI, "-o", "train.accum_steps=5",
                                "-o", "train.output_dir=/tmp/never-written-here", "--preflight"),
                     "data.batch_size=32 does not split into 1 rank(s) x train.accum_steps=5")


def test_linear_lr_scaling_scales_every_rate_of_a_stage():
    cfg = load_config("configs/demo.yaml", [
        "train.lr_scaling=linear", "train.reference_batch=16",
        "stages.1.warmup={steps: 2, start_lr: 0.001}", "stages.1.lr_schedule.end_lr=0.0001"])
    from training.recipe import lr_scale

    scale = lr_scale(cfg.train, cfg.data.batch_size)
    assert scale == 2.0
    schedule = build_schedule(cfg.stages[1], steps_per_epoch=5, scale=scale)
    lrs = []
    for _ in range(55):  # 10 epochs of 5 steps, then past the end
        lrs.append(schedule())
        schedule.step()
    assert lrs[0] == pytest.approx(0.002) and lrs[2] == pytest.approx(0.02)
    assert lrs[-1] == pytest.approx(0.0002)
    assert_one_error(run_script("main.py", *DEMO_CLI, "-o", "train.lr_scaling=linear", "--dry-run"),
                     "'train.reference_batch' is missing")


# 4. Activation recompute --------------------------------------------------------------------

def test_recompute_gives_the_same_loss_and_gradients_with_dropout_on():
    images, labels = load_digits("train")
    x = DevicePreprocess(32)(paddle.to_tensor(images[:8]))
    y = paddle.to_tensor(labels[:8])
    results = []
    for recompute in (False, True):
        paddle.seed(0)
        model = build_model(tiny_model_config(drop_rate=0.3, attn_drop_rate=0.1,
                                              drop_path_rate=0.1, recompute=recompute))
        if results:
            model.set_state_dict(results[0][2])
        assert sum(type(b).__name__ == "RecomputedBlock" for b in model.blocks) == 2 * recompute
        paddle.seed(5)  # the same dropout masks for both models
        parts = RDropLoss(alpha=5.0)(model(paddle.concat([x, x])), y)
        parts["loss"].backward()
        assert float(parts["kl"]) > 0  # the two copies did get different masks
        results.append((float(parts["loss"]),
                        {n: p.grad.numpy() for n, p in model.named_parameters()},
                        model.state_dict()))
    assert results[0][0] == results[1][0]
    for name, grad in results[0][1].items():
        np.testing.assert_allclose(results[1][1][name], grad, rtol=1e-6, atol=1e-9, err_msg=name)


def test_memory_bench_quick_prints_one_json_line():
    proc = run_script("bench/memory.py", "--quick", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["plain_bytes_per_image"] > 0 and result["recompute_bytes_per_image"] > 0
    assert result["recompute_over_plain"] == pytest.approx(
        result["recompute_bytes_per_image"] / result["plain_bytes_per_image"], abs=1e-3)
