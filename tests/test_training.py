"""training/engine.py and the run: training steps, staged optimizers, outputs of a run and
its repeatability, a non-finite validation, an out-of-memory as one line."""

import os
import subprocess
import sys

import numpy as np
import paddle
import pytest
from conftest import (
    ROOT,
    TINY_MODEL_KWARGS,
    read_records,
    small_demo_config,
)

from data.digits import load_digits
from losses import RDropLoss
from main import train
from models.build import build_model
from training import engine
from training.config import load_config
from training.engine import train_step, train_steps
from training.optim import build_optimizer
from training.stage import Stage
from training.state import EpochProgress
from utils.errors import UserError
from utils.schema import Node

RECORD_KEYS = {"stage", "epoch", "step", "lr", "train_loss", "train_ce", "train_kl", "val_top1", "val_top5",
               "val_loss", "images_per_s", "grad_norm", "grad_norm_max", "overflow_steps",
               "val_top1_ema"}  # the demo keeps an EMA


def _small_run(output_dir, *extra):
    """The demo recipe shrunk to seconds: 200 train / 100 val images, two one-epoch stages."""
    return load_config("configs/demo.yaml", [
        f"train.output_dir={output_dir}", "data.train_subset=200", "data.val_subset=100",
        "data.batch_size=32", "stages.0.epochs=1", "stages.0.warmup.epochs=0", "stages.1.epochs=2",
        *extra])


@pytest.mark.slow
def test_a_few_rdrop_steps_lower_the_loss(tiny_model_cfg):
    paddle.seed(0)
    model = build_model(tiny_model_cfg)
    images, labels = load_digits("train")
    x, y = paddle.to_tensor(images[:32]), paddle.to_tensor(labels[:32])
    cfg = load_config("configs/demo.yaml", ["stages.0.optimizer.lr=2e-3", "stages.0.warmup.epochs=0"])
    optimizer, _ = build_optimizer(cfg.stages[0], model, 20, cfg.train)
    seen_batches = []
    model.register_forward_pre_hook(lambda layer, inputs: seen_batches.append(inputs[0].shape[0]))
    losses, stage = [], Stage.of_parts(model, RDropLoss(alpha=1.0))
    for _ in range(20):
        parts = train_step(stage, x, y)
        optimizer.step()
        optimizer.clear_grad()
        losses.append(float(parts["loss"]))
    assert seen_batches == [64] * 20  # one forward over [x; x], never two
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_a_step_with_a_non_finite_loss_is_not_applied(tiny_model_cfg):
    paddle.seed(0)
    model = build_model(tiny_model_cfg)
    images, labels = load_digits("train")
    batches = [(paddle.to_tensor(images[i:i + 16]), paddle.to_tensor(labels[i:i + 16]))
               for i in range(0, 48, 16)]
    rdrop, calls = RDropLoss(alpha=1.0), []

    def nan_on_second_batch(logits, target):
        calls.append(1)
        parts = rdrop(logits, target)
        return {k: v * float("nan") for k, v in parts.items()} if len(calls) == 2 else parts

    nan_on_second_batch.copies = 2
    cfg = load_config("configs/demo.yaml", ["stages.0.warmup.epochs=0"])
    optimizer, _ = build_optimizer(cfg.stages[0], model, 3, cfg.train)
    snapshots, flags = [], []
    progress = EpochProgress()
    for step in train_steps(Stage.of_parts(model, nan_on_second_batch, optimizer), batches,
                            progress):
        flags.append(step.status)
        snapshots.append(model.head.weight.numpy().copy())
    means = progress.means()
    assert flags == ["applied", "nonfinite", "applied"]
    assert np.array_equal(snapshots[0], snapshots[1]) and not np.array_equal(snapshots[1],
                                                                             snapshots[2])
    assert progress.excluded == 16 and progress.seen == 48
    assert np.isfinite(means["loss"]) and means["loss"] > 0


def test_stage_optimizers_and_polynomial_decay():
    cfg = load_config("configs/demo.yaml", ["stages.0.warmup.epochs=0"])
    model = build_model(Node(cfg.model))
    adamw, scheduler = build_optimizer(cfg.stages[0], model, 10, cfg.train)
    assert isinstance(adamw, paddle.optimizer.AdamW) and scheduler is None
    steps = cfg.stages[1].epochs * 3
    momentum, scheduler = build_optimizer(cfg.stages[1], model, 3, cfg.train)  # 3 steps per epoch
    assert isinstance(momentum, paddle.optimizer.Momentum)
    lrs = []
    for _ in range(steps):
        lrs.append(momentum.get_lr())
        scheduler.step()
    start = cfg.stages[1].optimizer.lr
    assert lrs[0] == pytest.approx(start) and lrs[steps // 2] == pytest.approx(start * 0.5)
    assert momentum.get_lr() == pytest.approx(cfg.stages[1].lr_schedule.end_lr)


def test_momentum_stage_applies_l2_decay():
    cfg = load_config("configs/demo.yaml", ["stages.1.optimizer.l2_decay=0.5"])
    stage = cfg.stages[1]
    layer = paddle.nn.Linear(2, 2, bias_attr=False)
    layer.weight.set_value(paddle.ones([2, 2]))
    optimizer, _ = build_optimizer(stage, layer, 10, cfg.train)
    (layer.weight * 0.0).sum().backward()  # zero data gradient: only the decay moves the weight
    optimizer.step()
    assert float(layer.weight.numpy()[0, 0]) == pytest.approx(1.0 - stage.optimizer.lr * 0.5)


@pytest.mark.slow
def test_run_writes_metrics_checkpoints_and_logs(tmp_path):
    out = str(tmp_path / "run")
    best = train(_small_run(out, "stages.0.data={train_subset: 100, val_subset: 50}"))
    records = read_records(out)
    assert [(r["stage"], r["epoch"]) for r in records] == [(0, 1), (1, 1), (1, 2)]
    assert all(set(r) == RECORD_KEYS for r in records)
    assert all(r["images_per_s"] > 0 and 0 <= r["val_top1"] <= r["val_top5"] <= 1 for r in records)
    assert records[0]["lr"] == pytest.approx(3e-3)  # AdamW, constant
    assert records[2]["lr"] < records[1]["lr"]  # polynomial decay within the Momentum stage
    assert all(r["grad_norm_max"] >= r["grad_norm"] > 0 and r["overflow_steps"] == 0
               for r in records)
    for name in ("best.safetensors", "best.json", "last/raw.safetensors",
                 "last/optimizer.safetensors", "last/state.json", "config.yaml"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert os.listdir(os.path.join(out, "vdl"))
    # The 50-image subset stage cannot be "best" against the 100-image validation set.
    assert best["val_num_samples"] == 100 and best["stage"] == 1
    assert best["val_top1"] == max(max(r["val_top1"], r["val_top1_ema"]) for r in records[1:])


@pytest.mark.slow
def test_same_seed_same_run_and_baseline_differs(tmp_path):
    runs = []
    for name, extra in (("a", ()), ("b", ()), ("c", ("loss.rdrop=false",))):
        train(_small_run(str(tmp_path / name), *extra))
        runs.append(read_records(str(tmp_path / name)))
    first, again, baseline = runs
    for row in runs:
        for record in row:
            record.pop("images_per_s")
    assert first == again
    assert all(r["train_kl"] == 0.0 for r in baseline) and first[0]["train_kl"] > 0


def test_tiny_kwargs_are_the_demo_model():
    assert load_config("configs/demo.yaml").model.kwargs == TINY_MODEL_KWARGS


def test_a_non_finite_validation_loss_is_an_error_and_never_the_best(tmp_path, monkeypatch):
    from main import train
    from training import engine
    from training.config import load_config
    from utils.errors import UserError

    real = engine.evaluate

    def nan_for_the_ema(model, *args, **kwargs):
        result = real(model, *args, **kwargs)
        return dict(result, loss=float("nan")) if calls.append(1) or len(calls) % 2 == 0 \
            else result

    calls = []
    monkeypatch.setattr(engine, "evaluate", nan_for_the_ema)
    out = str(tmp_path / "run")
    cfg = load_config("configs/demo.yaml", [f"train.output_dir={out}", "data.train_subset=128",
                                            "data.val_subset=40", "stages.0.epochs=1"])
    with pytest.raises(UserError, match="the ema weights give a non-finite validation loss at "
                                        "stage 0 epoch 1"):
        train(cfg)
    assert not os.path.exists(os.path.join(out, "best.safetensors"))


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


@pytest.mark.slow
def test_the_engine_imports_no_model_builder_download_or_unpickler():
    """The loop and the update know nothing of building models, downloads or pickles: those
    happen at the run's edges."""
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, training.engine; print(' '.join(sys.modules))"],
        cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = set(proc.stdout.split())
    assert "training.engine" in loaded
    assert not loaded & {"models.build", "utils.io.download", "utils.io.safe_pickle",
                         "training.stage", "training.run", "utils.run_folder"}
