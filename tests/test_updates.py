"""The optimizer update: global clipping over parameter groups, fp16 loss scaling and its
overflow steps, gradient norms in the logs, AMP O2 master copies, and train.nan_policy
(divergence stops, skipped steps bounded and recorded)."""

import json
import math
import os

import numpy as np
import paddle
import pytest
from conftest import (
    DEMO_CLI,
    SUBSET_CLI,
    assert_one_error,
    digit_batches,
    read_records,
    run_script,
    run_stages_with_loss,
    seeded_tiny_model,
)

from data.preprocess import DevicePreprocess
from losses import RDropLoss
from main import train
from training import amp
from training.amp import GROWTH_INTERVAL, INIT_LOSS_SCALE, MIN_LOSS_SCALE, LossScaler, Precision
from training.config import load_config
from training.engine import train_steps
from training.grads import apply_update, trainable
from training.optim import (
    build_optimizer,
)
from training.stage import Stage
from training.state import EpochProgress
from utils.checkpoint import find_last, load_last

CLIP = 1.0


def _cfg(*overrides):
    return load_config("configs/demo.yaml", ["stages.0.warmup.epochs=0", *overrides])


def _loss_scaling():
    """fp16's loss scaling on the CPU: autocast stays off (Paddle applies it on GPUs only),
    the scaling, unscaling and skip decisions are what runs."""
    precision = Precision()
    precision.scaler = LossScaler(enabled=True)
    return precision




def test_clipping_takes_one_norm_over_all_parameter_groups():
    model = seeded_tiny_model()
    cfg = _cfg(f"train.clip_grad_norm={CLIP}",
               "stages.1.optimizer={name: Momentum, lr: 1.0, momentum: 0.0}")
    optimizer, _ = build_optimizer(cfg.stages[1], model, 1, cfg.train)
    assert len(optimizer._param_groups) == 2  # decay / no-decay: biases, norms, pos_embed
    (images, labels), = digit_batches(1, size=32)
    parts = RDropLoss(alpha=1.0)(model(DevicePreprocess(32)(paddle.concat([images, images]))),
                                 labels)
    (parts["loss"] * 100.0).backward()  # far above the limit
    grads = {n: p.grad.numpy().astype(np.float64) for n, p in model.named_parameters()}
    before = {n: p.numpy().astype(np.float64) for n, p in model.named_parameters()}
    norm = math.sqrt(sum((g ** 2).sum() for g in grads.values()))
    assert norm > 10 * CLIP
    reported, status = apply_update(optimizer, trainable(model), Precision(), CLIP)
    assert status == "applied" and reported == pytest.approx(norm, rel=1e-6)
    updates = {n: before[n] - p.numpy().astype(np.float64) for n, p in model.named_parameters()}
    for name, grad in grads.items():  # SGD with lr 1: the update is the clipped gradient
        np.testing.assert_allclose(updates[name], grad * CLIP / norm, rtol=1e-4, atol=1e-7,
                                   err_msg=name)
    total = math.sqrt(sum((u ** 2).sum() for u in updates.values()))
    assert total == pytest.approx(CLIP, rel=1e-4)
    # Each group keeps its share of the gradient: no group is scaled up to the limit alone.
    excluded = {n for n, p in model.named_parameters()
                if any(p is q for q in optimizer._param_groups[1]["params"])}
    group_norm = {flag: math.sqrt(sum((updates[n] ** 2).sum() for n in updates
                                      if (n in excluded) == flag)) for flag in (True, False)}
    assert group_norm[True] < 0.9 * CLIP and group_norm[False] < 0.9 * CLIP


def test_no_clipping_below_the_limit_and_the_norm_is_still_reported():
    model = seeded_tiny_model()
    cfg = _cfg("stages.1.optimizer={name: Momentum, lr: 1.0, momentum: 0.0}")
    optimizer, _ = build_optimizer(cfg.stages[1], model, 1, cfg.train)
    sum((p * 1e-4).sum() for p in model.parameters()).backward()
    before = {n: p.numpy().copy() for n, p in model.named_parameters()}
    norm, status = apply_update(optimizer, trainable(model), Precision(), clip_norm=1e6)
    expected = 1e-4 * math.sqrt(sum(p.size for p in model.parameters()))
    assert status == "applied" and norm == pytest.approx(expected, rel=1e-5)
    for name, param in model.named_parameters():
        np.testing.assert_allclose(before[name] - param.numpy(), 1e-4, rtol=1e-3, err_msg=name)


class _InjectsNonFiniteGradients:
    """The R-Drop loss; on the listed calls the gradient reaching the logits is made
    infinite while the loss stays finite (what an fp16 overflow in the backward looks like)."""

    copies = 2

    def __init__(self, calls):
        self.calls, self.count, self.loss = set(calls), 0, RDropLoss(alpha=1.0)

    def __call__(self, logits, labels):
        self.count += 1
        if self.count in self.calls:
            logits.register_hook(lambda grad: grad * float("inf"))
        return self.loss(logits, labels)

    def in_words(self, means):
        return self.loss.in_words(means)


def _run_epoch(precision, criterion, batches, warmup_steps=4):
    model = seeded_tiny_model()
    cfg = _cfg(f"stages.0.warmup={{steps: {warmup_steps}, start_lr: 0.0}}")
    optimizer, scheduler = build_optimizer(cfg.stages[0], model, len(batches), cfg.train)
    seen, progress = [], EpochProgress()
    stage = Stage.of_parts(model, criterion, optimizer, scheduler=scheduler, precision=precision,
                           clip_norm=CLIP)
    for step in train_steps(stage, batches, progress):
        seen.append((step.status, step.values["lr"], step.values["grad_norm"],
                     model.head.weight.numpy().copy()))
    means = progress.means()
    return seen, progress, means, optimizer


def test_an_fp16_overflow_step_is_skipped_and_moves_nothing():
    batches = digit_batches(4)
    plain, _, _, _ = _run_epoch(Precision(), RDropLoss(alpha=1.0), batches[:1])
    precision = _loss_scaling()
    seen, progress, means, optimizer = _run_epoch(precision, _InjectsNonFiniteGradients({2}),
                                                  batches)
    statuses, lrs, norms, heads = zip(*seen)
    assert statuses == ("applied", "overflow", "applied", "applied")
    assert np.array_equal(heads[0], heads[1]) and not np.array_equal(heads[1], heads[2])
    # The schedule does not advance on the skipped step: warmup 0 -> 3e-3 over 4 steps.
    assert lrs == pytest.approx((0.0, 0.75e-3, 0.75e-3, 1.5e-3))
    assert optimizer.get_lr() == pytest.approx(2.25e-3)
    # Norms are of the unscaled gradients (the first step equals the float32 run's).
    assert norms[0] == pytest.approx(plain[0][2], rel=1e-5) and not math.isfinite(norms[1])
    assert (progress.steps, progress.overflow_steps) == (3, 1)
    finite = [norms[i] for i in (0, 2, 3)]
    assert means["grad_norm"] == pytest.approx(np.mean(finite)) and means["overflow_steps"] == 1
    assert means["grad_norm_max"] == pytest.approx(max(finite))
    assert precision.scaler.state_dict() == {"scale": INIT_LOSS_SCALE / 2, "good_steps": 2}


def test_loss_scaling_without_overflow_trains_exactly_as_float32():
    batches = digit_batches(3)
    plain, _, _, _ = _run_epoch(Precision(), RDropLoss(alpha=1.0), batches)
    scaled, _, _, _ = _run_epoch(_loss_scaling(), RDropLoss(alpha=1.0), batches)
    for (status, _, norm, head), (status2, _, norm2, head2) in zip(plain, scaled):
        assert status == status2 == "applied"  # the scale is a power of two: exact
        assert norm2 == pytest.approx(norm, rel=1e-12) and np.array_equal(head, head2)


def test_loss_scale_halves_on_overflow_and_doubles_after_the_growth_interval():
    scaler = LossScaler(enabled=True)
    scaler.update(False)
    assert scaler.state_dict() == {"scale": INIT_LOSS_SCALE / 2, "good_steps": 0}
    for _ in range(GROWTH_INTERVAL - 1):
        scaler.update(True)
    assert scaler.scale == INIT_LOSS_SCALE / 2
    scaler.update(True)
    assert scaler.state_dict() == {"scale": INIT_LOSS_SCALE, "good_steps": 0}
    scaler.update(True)
    restored = LossScaler(enabled=True)
    restored.load_state_dict(scaler.state_dict())
    assert restored.state_dict() == {"scale": INIT_LOSS_SCALE, "good_steps": 1}
    # A checkpoint written with paddle.amp.GradScaler's state still resumes.
    restored.load_state_dict({"scale": np.array([1024.0], dtype=np.float32), "incr_count": 7,
                              "decr_count": 0, "incr_ratio": 2.0})
    assert restored.state_dict() == {"scale": 1024.0, "good_steps": 7}
    off = LossScaler(enabled=False)
    off.update(False)
    assert off.scale == 1.0


class _InjectsNonFiniteLoss:
    """The R-Drop loss, infinite on the listed calls (an fp16 overflow in the forward pass:
    inf logits or attention scores)."""

    copies = 2

    def __init__(self, calls):
        self.calls, self.count, self.loss = set(calls), 0, RDropLoss(alpha=1.0)

    def __call__(self, logits, labels):
        self.count += 1
        parts = self.loss(logits, labels)
        if self.count in self.calls:
            parts["loss"] = parts["loss"] * float("inf")
        return parts

    def in_words(self, means):
        return self.loss.in_words(means)


def test_an_fp16_overflow_of_the_loss_is_skipped_like_one_of_the_gradients():
    precision = _loss_scaling()
    seen, progress, means, optimizer = _run_epoch(precision, _InjectsNonFiniteLoss({2}),
                                                  digit_batches(4))
    statuses, lrs, norms, heads = zip(*seen)
    assert statuses == ("applied", "overflow", "applied", "applied")
    assert np.array_equal(heads[0], heads[1]) and norms[1] is None
    assert lrs == pytest.approx((0.0, 0.75e-3, 0.75e-3, 1.5e-3))  # the schedule waited
    assert (progress.steps, progress.overflow_steps) == (3, 1)
    assert precision.scaler.state_dict() == {"scale": INIT_LOSS_SCALE / 2, "good_steps": 2}
    assert progress.excluded == 16 and means["loss"] is not None  # its loss is left out


@pytest.mark.parametrize("injected", ["loss", "gradient"])
def test_an_overflow_that_persists_at_the_minimum_loss_scale_is_a_non_finite_step(injected):
    precision = _loss_scaling()
    precision.scaler.load_state_dict({"scale": 2 * MIN_LOSS_SCALE, "good_steps": 5})
    criterion = (_InjectsNonFiniteLoss if injected == "loss" else
                 _InjectsNonFiniteGradients)({1, 2, 3})
    seen, progress, _, _ = _run_epoch(precision, criterion, digit_batches(4))
    statuses, _, _, heads = zip(*seen)
    # Halved once to the minimum, then each further one is for train.nan_policy.
    assert statuses == ("overflow", "nonfinite", "nonfinite", "applied")
    assert all(np.array_equal(heads[0], head) for head in heads[1:3])
    assert precision.scaler.state_dict() == {"scale": MIN_LOSS_SCALE, "good_steps": 1}
    assert (progress.steps, progress.overflow_steps) == (1, 1)
    assert seen[0][0] == "overflow" and [s for s, *_ in seen].count("nonfinite") == 2


def test_scaler_never_goes_below_its_minimum():
    scaler = LossScaler(enabled=True)
    halvings = [scaler.update(False) for _ in range(20)]
    assert halvings == [True] * 15 + [False] * 5  # 2^15 down to 2^0
    assert scaler.scale == MIN_LOSS_SCALE == 1.0


def test_without_loss_scaling_a_non_finite_gradient_is_a_non_finite_step():
    seen, progress, _, _ = _run_epoch(Precision(), _InjectsNonFiniteGradients({2}), digit_batches(3))
    statuses, _, _, heads = zip(*seen)
    assert statuses == ("applied", "nonfinite", "applied")
    assert np.array_equal(heads[0], heads[1])
    assert (progress.steps, progress.overflow_steps) == (2, 0)


@pytest.mark.slow
@pytest.mark.parametrize("injector", [_InjectsNonFiniteGradients, _InjectsNonFiniteLoss])
def test_overflow_steps_move_neither_the_ema_nor_the_step_count_and_are_logged(tmp_path,
                                                                              monkeypatch,
                                                                              injector):
    """Under train.nan_policy: stop (the default) an fp16 overflow, of the loss or of the
    gradients, is skipped and the run goes on."""
    precision = _loss_scaling()
    monkeypatch.setattr(amp, "Precision", lambda *args: precision)
    criterion = injector({1, 3})
    run_stages_with_loss(monkeypatch, lambda index: criterion)
    out = str(tmp_path / "run")
    train(load_config("configs/demo.yaml", [
        f"train.output_dir={out}", "data.train_subset=64", "data.val_subset=20",
        "data.batch_size=16", "stages.0.epochs=1", "stages.1.epochs=1"]))
    first, second = read_records(out)
    assert (first["overflow_steps"], second["overflow_steps"]) == (2, 0)
    assert second["grad_norm_max"] >= second["grad_norm"] > 0
    with open(os.path.join(out, "last", "state.json"), encoding="utf-8") as handle:
        state = json.load(handle)
    assert state["global_step"] == 8 - 2 and state["updates"]["ema"] == 8 - 2
    from visualdl import LogReader

    vdl = os.path.join(out, "vdl")
    reader = LogReader(file_path=os.path.join(vdl, os.listdir(vdl)[0]))
    assert len(reader.get_data("scalar", "train/grad_norm")) == 6
    assert [e.value for e in reader.get_data("scalar", "epoch/overflow_steps")] == [2, 0]
    from utils.checkpoint import load_last

    _, trees = load_last(os.path.join(out, "last"))  # two halvings, then 5 good updates
    assert trees["scaler"] == {"scale": INIT_LOSS_SCALE / 4, "good_steps": 5}


@pytest.mark.slow
def test_an_epoch_of_skipped_steps_records_no_loss_and_standard_json(tmp_path, monkeypatch):
    from losses.rdrop import RDropLoss
    from main import train
    from training.config import load_config

    loss = RDropLoss(alpha=1.0)

    def nan_loss(logits, labels):
        return {k: v * float("nan") for k, v in loss(logits, labels).items()}

    nan_loss.copies, nan_loss.in_words = 2, loss.in_words
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


DIVERGE = [*DEMO_CLI, *SUBSET_CLI, "-o", "stages.0.warmup.epochs=0", "-o", "stages.0.optimizer.lr=1e30",
           "-o", "train.save_every_steps=1"]


@pytest.mark.slow
def test_divergence_stops_naming_where_and_keeps_the_last_good_checkpoint(tmp_path):
    out = str(tmp_path / "out")
    proc = run_script("main.py", *DIVERGE, "-o", f"train.output_dir={out}")
    assert_one_error(proc, "the loss is not finite at stage 0 epoch 1 step 2 (lr 1e+30",
                     f"the last good checkpoint is {out}/last", "lower stages.0.optimizer.lr",
                     "stages.0.warmup.steps", "train.clip_grad_norm", "train.nan_policy=skip")
    state, trees = load_last(find_last(out))
    assert state["global_step"] == 1 and state["position"]["micro"] == 1
    assert all(np.isfinite(array).all() for array in trees["raw"].values())


@pytest.mark.slow
def test_skipping_non_finite_steps_is_bounded(tmp_path):
    out = str(tmp_path / "out")
    proc = run_script("main.py", *DIVERGE, "-o", f"train.output_dir={out}",
                      "-o", "train.nan_policy=skip", "-o", "train.nan_max_skips=2")
    assert_one_error(proc, "3 steps had a non-finite loss or gradient, more than train.nan_max_skips=2")
    assert proc.stdout.count("skipped the update of stage 0 epoch 1") == 2
