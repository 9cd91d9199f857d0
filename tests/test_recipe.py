"""The recipe's mechanics: stage conditions, warmup, accumulation, decay exclusions, EMA/SWA
and warm start (clipping: test_updates.py)."""

import json
import math
import os

import numpy as np
import paddle
import pytest
from conftest import (
    DEMO_CLI,
    assert_one_error,
    read_records,
    run_script,
)

from data.digits import load_digits
from losses import RDropLoss
from main import train
from models.build import build_model
from training.averaging import EMA, SWA
from training.config import load_config
from training.engine import train_step
from training.optim import (
    build_optimizer,
    build_schedule,
    decay_groups,
    optimizer_state_for,
    portable_optimizer_state,
)
from training.recipe import describe_stage
from training.stage import Stage
from utils.schema import Node

SMALL = ["data.train_subset=256", "data.val_subset=100", "data.batch_size=32"]


def _cfg(*overrides):
    return load_config("configs/demo.yaml", [*SMALL, *overrides])


@pytest.mark.slow
def test_stage_ends_early_on_threshold_and_otherwise_runs_its_epochs(tmp_path):
    out = str(tmp_path / "run")
    train(_cfg(f"train.output_dir={out}", "stages.0.epochs=3", "stages.0.until={val_top1: 0.0}",
             "stages.1.epochs=2", "stages.1.until={val_top1: 1.0}"))
    assert [(r["stage"], r["epoch"]) for r in read_records(out)] == [(0, 1), (1, 1), (1, 2)]


def test_warmup_then_polynomial_decay_lr_values():
    cfg = _cfg("stages.1.warmup={steps: 4, start_lr: 0.001}", "stages.1.epochs=2")
    stage = cfg.stages[1]  # Momentum lr 0.01, polynomial to 0, power 1
    schedule = build_schedule(stage, steps_per_epoch=7)
    lrs = []
    for _ in range(14):
        lrs.append(schedule())
        schedule.step()
    warm = [0.001 + (0.01 - 0.001) * t / 4 for t in range(4)]
    decay = [0.01 * (1 - t / 10) for t in range(10)]
    assert lrs == pytest.approx(warm + decay)
    in_epochs = build_schedule(_cfg("stages.1.warmup={epochs: 0.5}").stages[1], steps_per_epoch=10)
    assert in_epochs.warmup_steps == 5


@pytest.mark.parametrize("warmup", [0, 5])
def test_cosine_decay_after_warmup_follows_the_formula(warmup):
    cfg = _cfg(f"stages.1.warmup={{steps: {warmup}}}", "stages.1.epochs=3",
               "stages.1.lr_schedule={name: cosine, end_lr: 0.0005}")
    schedule = build_schedule(cfg.stages[1], steps_per_epoch=40)  # Momentum lr 0.01, 120 steps
    lrs = []
    for _ in range(120):
        lrs.append(schedule())
        schedule.step()
    decay = 120 - warmup
    expected = [0.01 * t / warmup for t in range(warmup)] + [
        0.0005 + (0.01 - 0.0005) * (1 + math.cos(math.pi * t / decay)) / 2 for t in range(decay)]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert "cosine decay to 0.0005 over the stage" in describe_stage(cfg, 1, 384)
    resumed = build_schedule(cfg.stages[1], steps_per_epoch=40)
    stopped = build_schedule(cfg.stages[1], steps_per_epoch=40)
    for _ in range(37):
        stopped.step()
    resumed.set_state_dict(json.loads(json.dumps(stopped.state_dict())))  # as a checkpoint
    later = []
    for _ in range(120 - 37):
        later.append(resumed())
        resumed.step()
    assert later == pytest.approx(lrs[37:], rel=1e-12)


def test_warmup_in_steps_and_epochs_together_or_to_a_lower_lr_is_an_error():
    from utils.errors import UserError

    with pytest.raises(UserError, match=r"'stages.0.warmup.steps' and '.epochs': give one"):
        _cfg("stages.0.warmup={steps: 2, epochs: 1}")
    with pytest.raises(UserError, match="'train.swa.stage' must name one of the 2 stages"):
        _cfg("train.swa.stage=2")
    with pytest.raises(UserError, match="warmup.start_lr=0.5 must be below optimizer.lr=0.003"):
        build_schedule(_cfg("stages.0.warmup.start_lr=0.5").stages[0], steps_per_epoch=5)


def test_accumulated_gradients_equal_the_big_batch_gradients(tiny_model_cfg):
    images, labels = load_digits("train")
    x, y = paddle.to_tensor(images[:16]), paddle.to_tensor(labels[:16])
    paddle.seed(0)
    model = build_model(Node(tiny_model_cfg, drop_rate=0.0))  # no dropout: same function twice
    loss = RDropLoss(alpha=5.0)
    stage = Stage.of_parts(model, loss)
    train_step(stage, x, y)
    big = {name: p.grad.numpy().copy() for name, p in model.named_parameters()}
    model.clear_gradients()
    for part in range(4):
        train_step(stage, x[part * 4:(part + 1) * 4], y[part * 4:(part + 1) * 4], 0.25)
    for name, param in model.named_parameters():
        assert np.allclose(param.grad.numpy(), big[name], rtol=1e-4, atol=1e-6), name


def test_no_weight_decay_on_biases_norms_position_embedding_and_tokens(tiny_model_cfg):
    model = build_model(tiny_model_cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = decay_groups(model, exclude=True)
    excluded = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed", "cls_token", "dist_token", "norm.weight", "norm.bias", "head.bias",
            "blocks.0.norm1.weight", "blocks.1.attn.qkv.bias"} <= excluded
    assert all(n.endswith(("bias", "pos_embed", "cls_token", "dist_token")) or "norm" in n
               for n in excluded)
    assert {names[id(p)] for p in decay["params"]} >= {"blocks.0.attn.qkv.weight", "head.weight",
                                                       "patch_embed.proj.weight"}
    assert len(decay_groups(model, exclude=False)) == 1
    # Behaviour: with zero gradients AdamW only decays, and only the decayed group moves.
    cfg = _cfg("stages.0.optimizer.weight_decay=0.5", "stages.0.warmup.epochs=0")
    optimizer, _ = build_optimizer(cfg.stages[0], model, 1, cfg.train)
    before = {n: p.numpy().copy() for n, p in model.named_parameters()}
    sum((p * 0.0).sum() for p in model.parameters()).backward()
    optimizer.step()
    for name, param in model.named_parameters():
        moved = not np.array_equal(param.numpy(), before[name])
        assert moved == (name not in excluded), name


def test_ema_and_swa_match_hand_computation():
    layer = paddle.nn.Linear(1, 1, bias_attr=False)
    values = [1.0, 3.0, 7.0, 15.0]
    ema, ema_plain, swa = None, None, None
    for value in values:
        layer.weight.set_value(paddle.full([1, 1], value))
        if ema is None:
            ema, ema_plain, swa = EMA(layer, 0.9, True), EMA(layer, 0.5, False), SWA(layer)
        ema.update(layer)
        ema_plain.update(layer)
        swa.update(layer)
    expected, expected_plain = values[0], values[0]
    for t, value in enumerate(values):
        decay = min(0.9, (1 + t) / (10 + t))
        expected = decay * expected + (1 - decay) * value
        expected_plain = 0.5 * expected_plain + 0.5 * value
    assert ema.state_dict()["weight"].numpy().item() == pytest.approx(expected, rel=1e-6)
    assert ema_plain.state_dict()["weight"].numpy().item() == pytest.approx(expected_plain)
    assert swa.state_dict()["weight"].numpy().item() == pytest.approx(np.mean(values))
    assert swa.updates == 4 and ema.updates == 4


def test_optimizer_state_moves_between_processes_with_other_parameter_names(tiny_model_cfg):
    cfg = _cfg()
    first = build_model(tiny_model_cfg)
    optimizer, _ = build_optimizer(cfg.stages[0], first, 1, cfg.train)
    sum((p * p).sum() for p in first.parameters()).backward()
    optimizer.step()
    portable = portable_optimizer_state(first, optimizer)
    assert any(key.startswith("@blocks.0.attn.qkv.weight_") for key in portable)
    second = build_model(tiny_model_cfg)  # Paddle names its parameters anew
    assert second.head.weight.name != first.head.weight.name
    mapped = optimizer_state_for(second, portable)
    own = [p.name + "_" for p in second.parameters()]
    accumulators = [key for key in mapped if key not in ("LR_Scheduler", "master_weights")]
    assert accumulators and all(key.startswith(tuple(own)) for key in accumulators)


@pytest.mark.parametrize("stage", [0, 1])  # AdamW, Momentum
def test_a_restored_optimizer_state_is_whole_before_its_first_step(tiny_model_cfg, stage):
    """A checkpoint written between a resume and its first step (a stop during the
    validation the resume started with) holds every moment the resume loaded: Paddle 2.6's
    state_dict() alone returns none of them."""
    cfg = _cfg()
    first = build_model(tiny_model_cfg)
    optimizer, _ = build_optimizer(cfg.stages[stage], first, 1, cfg.train)
    sum((p * p).sum() for p in first.parameters()).backward()
    optimizer.step()
    saved = {key: value.numpy().copy()
             for key, value in portable_optimizer_state(first, optimizer).items()
             if key not in ("LR_Scheduler", "master_weights")}
    second = build_model(tiny_model_cfg)
    restored, _ = build_optimizer(cfg.stages[stage], second, 1, cfg.train)
    restored.set_state_dict(optimizer_state_for(second, portable_optimizer_state(first, optimizer)))
    again = portable_optimizer_state(second, restored)
    assert len(saved) >= 2 * len(list(first.parameters())) if stage == 0 else len(saved) > 0
    assert sorted(key for key in again if key != "LR_Scheduler") == sorted(saved)
    for key, value in saved.items():
        assert np.array_equal(again[key].numpy(), value), key


@pytest.mark.slow
def test_warm_start_from_our_own_checkpoint(tmp_path):
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    train(_cfg(f"train.output_dir={first}", "stages.0.epochs=2", "stages.1.epochs=1"))
    with open(os.path.join(first, "best.json"), encoding="utf-8") as handle:
        best = json.load(handle)
    # LR 0: the carried weights are evaluated unchanged after one epoch.
    proc = run_script("main.py", "-c", "configs/demo.yaml", *[a for o in SMALL for a in ("-o", o)],
                      "-o", f"train.output_dir={second}", "-o", "stages.0.epochs=1",
                      "-o", "stages.0.optimizer.lr=0.0", "-o", "stages.0.warmup.epochs=0",
                      "-o", "stages.1.epochs=1",
                      "--init-from", first)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"weights {first}/best.safetensors: loaded" in proc.stdout \
        and "skipped 0" in proc.stdout
    assert read_records(second)[0]["val_top1"] == pytest.approx(best["val_top1"])


@pytest.mark.slow
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
