"""The R-Drop authors' recipe: its parts trained together on the demo, its config, stages
budgeted in optimizer steps and validation every few steps (the same weights, resumed at
its place)."""

import json
import math
import os

import numpy as np
import paddle
import pytest
from conftest import read_records, run_script

from data.digits import load_digits
from data.preprocess import DevicePreprocess
from main import train
from models.build import build_model
from training.config import load_config
from training.recipe import describe_stage

SMALL = ["data.train_subset=256", "data.val_subset=100", "data.batch_size=32"]


def _cfg(*overrides):
    return load_config("configs/demo.yaml", [*SMALL, *overrides])


@pytest.mark.slow
def test_the_paper_recipes_parts_train_together_on_the_demo(tmp_path, capsys):
    from losses import build_loss
    from training.recipe import stage_loss

    out = str(tmp_path / "paper")
    cfg = _cfg(f"train.output_dir={out}", "loss.form=paper", "loss.alpha=0.3",
               "model.head_init=zero", "data.hflip_prob=0.0", "data.rotation=0.0",
               "data.random_resized_crop={scale: [0.05, 1.0]}", "stages.0.epochs=1",
               "stages.1.epochs=2", "stages.1.warmup={steps: 3}",
               "stages.1.lr_schedule={name: cosine, end_lr: 0.0}", "train.clip_grad_norm=1.0")
    paddle.seed(0)
    model = build_model(cfg.model)
    model.train()
    criterion = build_loss(stage_loss(cfg.loss, cfg.stages[1]))
    images, labels = load_digits("train")
    x = DevicePreprocess(32)(paddle.to_tensor(images[:8]))
    parts = criterion(model(paddle.concat([x, x])), paddle.to_tensor(labels[:8]))
    # Zero heads: every class equally likely in both copies, whatever the dropout masks.
    assert float(parts["ce"]) == pytest.approx(2 * math.log(10), rel=1e-6)
    assert float(parts["kl"]) == 0.0
    train(cfg)
    plan = capsys.readouterr().out
    assert "random-resized crop scale 0.05-1" in plan and "cosine decay to 0" in plan
    assert "in the paper's form" in plan
    records = read_records(out)
    assert len(records) == 3
    for record in records:
        assert record["train_loss"] == pytest.approx(record["train_ce"] + 0.3 * record["train_kl"],
                                                     rel=1e-6)
    assert records[-1]["lr"] < records[-2]["lr"]


def _assert_same_records(expected, got):
    """A resumed run's records: the uninterrupted run's, but for the speed."""
    assert len(got) == len(expected)
    for want, have in zip(expected, got):
        assert set(have) == set(want)
        for key in want:
            if key != "images_per_s":
                assert have[key] == pytest.approx(want[key], rel=1e-5, abs=1e-12), key


@pytest.mark.slow
def test_a_stage_budgeted_in_steps_ends_midway_through_an_epoch_and_resumes_there(
        tmp_path, monkeypatch):
    import signal

    from utils.errors import Interrupted
    from utils.reports.logger import RunLogger

    overrides = ["stages.0.epochs=1", "stages.1.epochs=null", "stages.1.steps=20",
                 "train.save_every_steps=100"]  # 8 steps per epoch: 8 + 8 + 4
    whole_out, cut_out = str(tmp_path / "whole"), str(tmp_path / "cut")
    cfg = _cfg(*overrides, f"train.output_dir={whole_out}")
    assert "[1] momentum: 20 optimizer steps;" in describe_stage(cfg, 1, 32)
    train(cfg)
    whole = read_records(whole_out)
    assert [(r["stage"], r["epoch"]) for r in whole] == [(0, 1), (1, 1), (1, 2), (1, 3)]
    assert whole[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # polynomial decay over 20 steps
    with open(os.path.join(whole_out, "last", "state.json"), encoding="utf-8") as handle:
        assert json.load(handle)["global_step"] == 8 + 20

    real_log_step = RunLogger.log_step

    def stop_in_the_short_epoch(self, step, values):
        real_log_step(self, step, values)
        if step == 8 + 16 + 1:  # the second step of stage 1's last, 4-step epoch
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(RunLogger, "log_step", stop_in_the_short_epoch)
    cfg = _cfg(*overrides, f"train.output_dir={cut_out}")
    with pytest.raises(Interrupted):
        train(cfg)
    with open(os.path.join(cut_out, "last", "state.json"), encoding="utf-8") as handle:
        assert json.load(handle)["position"] == {"stage": 1, "epoch": 2, "micro": 2}
    monkeypatch.undo()
    train(cfg, resume=True)
    _assert_same_records(whole, read_records(cut_out))


@pytest.mark.slow
def test_the_paper_recipe_config_shows_the_authors_settings():
    proc = run_script("main.py", "-c", "configs/rdrop_paper_recipe.yaml", "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for fragment in ("10000 optimizer steps", "Momentum lr=0.01 momentum=0.9 l2_decay=0",
                     "cosine decay to 0 over the stage after 500 steps of linear warmup",
                     "512 images per optimizer step", "32 on one process",
                     "random-resized crop scale 0.05-1", "hflip p=0", "clip global norm 1",
                     "R-Drop alpha=0.3 in the paper's form", "validation also every 100 steps"):
        assert fragment in proc.stdout, fragment
    cfg = load_config("configs/rdrop_paper_recipe.yaml")
    assert cfg.model.head_init == "zero" and cfg.model.drop_rate == 0.1
    assert cfg.model.attn_drop_rate == 0.0 and cfg.train.accum_steps == 16


@pytest.mark.slow
def test_validation_every_few_steps_changes_no_weight_and_resumes_at_its_place(
        tmp_path, monkeypatch):
    import signal

    from safetensors.numpy import load_file

    from utils.errors import Interrupted
    from utils.reports.logger import RunLogger

    overrides = ["stages.0.epochs=1", "stages.1.epochs=null", "stages.1.steps=20",
                 "train.ema.enabled=true"]  # 8 steps per epoch
    plain_out, every_out, cut_out = (str(tmp_path / name) for name in ("plain", "every", "cut"))
    train(_cfg(*overrides, f"train.output_dir={plain_out}"))
    train(_cfg(*overrides, "train.eval_every_steps=3", f"train.output_dir={every_out}"))
    for name in ("raw", "ema"):  # validating in between changes nothing of the training
        plain = load_file(os.path.join(plain_out, "last", f"{name}.safetensors"))
        every = load_file(os.path.join(every_out, "last", f"{name}.safetensors"))
        assert all(np.array_equal(plain[key], every[key]) for key in plain), name
    every = read_records(every_out)
    assert [(r["stage"], r["epoch"], r["step"]) for r in every] == [
        (0, 1, 3), (0, 1, 6), (0, 1, 8), (1, 1, 3), (1, 1, 6), (1, 1, 8), (1, 2, 9), (1, 2, 12),
        (1, 2, 15), (1, 2, 16), (1, 3, 18), (1, 3, 20)]
    plain = read_records(plain_out)
    assert [r["val_top1"] for r in plain] == [every[i]["val_top1"] for i in (2, 5, 9, 11)]

    real_log_step = RunLogger.log_step

    def stop_at_a_validation_step(self, step, values):
        real_log_step(self, step, values)
        if step == 8 + 8:  # stage 1's 9th step: the first of its second epoch, a validation
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(RunLogger, "log_step", stop_at_a_validation_step)
    cfg = _cfg(*overrides, "train.eval_every_steps=3", f"train.output_dir={cut_out}")
    with pytest.raises(Interrupted):
        train(cfg)
    with open(os.path.join(cut_out, "last", "state.json"), encoding="utf-8") as handle:
        state = json.load(handle)
    assert state["position"] == {"stage": 1, "epoch": 1, "micro": 1, "evaluating": True}
    assert state["records"] == 6 and state["epoch_index"] == 2
    monkeypatch.undo()
    train(cfg, resume=True)
    _assert_same_records(every, read_records(cut_out))
