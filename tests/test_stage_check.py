"""Every stage proven before the first trains: its settings validated at start, one trial
step of its setup on scratch state that leaves the run bit-identical, one error naming the
stage when it cannot run; and a resume after correcting a stage that has not started."""

import os
import random
from types import SimpleNamespace

import numpy as np
import paddle
import pytest
from conftest import (
    assert_one_error,
    assert_same_run,
    read_records,
    run_script,
    stop_at_evaluation,
)

from main import train
from training import amp
from training.amp import LossScaler, Precision
from training.config import load_config
from training.optim import build_optimizer
from training.stage_check import _failure, check_stages
from training.state import Position, RunState, check_same_config
from utils.checkpoint import load_last
from utils.config import to_plain
from utils.errors import UserError
from utils.io.tensor_io import load_tensors
from utils.run_folder import RunFolder

CONFIG = "configs/demo_fixres.yaml"
SHORT = ["data.train_subset=128", "data.val_subset=40", "stages.0.epochs=1",
         "stages.1.epochs=1", "stages.2.epochs=1", "train.progress=off"]


def _cfg(out, *extra):
    return load_config(CONFIG, [*SHORT, f"train.output_dir={out}", *extra])


def _loss_scaling(*args):
    """fp16's loss scaling on the CPU (autocast stays off): the scaler's state is part of
    what the check must leave alone."""
    precision = Precision()
    precision.scaler = LossScaler(enabled=True)
    return precision


@pytest.fixture(scope="module")
def checked_and_unchecked(tmp_path_factory):
    """The short FixRes demo (3 stages, EMA, accumulation, fp16 loss scaling) with the stage
    check and without it."""
    folders = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(amp, "Precision", _loss_scaling)
        for check in (True, False):
            out = str(tmp_path_factory.mktemp(f"check-{check}"))
            train(_cfg(out, f"train.check_stages={str(check).lower()}", "train.accum_steps=2"))
            folders[check] = out
    return folders


@pytest.mark.slow
def test_the_stage_check_leaves_the_run_bit_identical(checked_and_unchecked):
    checked, unchecked = checked_and_unchecked[True], checked_and_unchecked[False]
    assert_same_run(unchecked, checked, records=3, kinds=("raw", "ema"))
    for name in ("optimizer", "scaler"):
        a = load_tensors(os.path.join(unchecked, "last", f"{name}.safetensors"))[0]
        b = load_tensors(os.path.join(checked, "last", f"{name}.safetensors"))[0]
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name
    state = {check: load_last(os.path.join(folder, "last"), trees=False)[0]
             for check, folder in checked_and_unchecked.items()}
    for key in ("position", "global_step", "epoch_index", "updates"):
        assert state[True][key] == state[False][key], key
    timeless = [{k: v for k, v in state[check]["best"].items() if k != "images_per_s"}
                for check in (True, False)]
    assert timeless[0] == timeless[1]


def test_the_stage_check_draws_nothing_from_any_random_stream(tmp_path, capsys):
    cfg = _cfg(str(tmp_path), "model.drop_path_rate=0.1")
    precision = _loss_scaling()
    paddle.seed(7)
    np.random.seed(7)
    random.seed(7)
    expected = (paddle.rand([3]).numpy(), np.random.rand(3), random.random())
    paddle.seed(7)
    np.random.seed(7)
    random.seed(7)
    check_stages(cfg, precision)
    got = (paddle.rand([3]).numpy(), np.random.rand(3), random.random())
    assert all(np.array_equal(a, b) for a, b in zip(expected, got))
    assert precision.scaler.state_dict() == LossScaler(enabled=True).state_dict()
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("stage check: stages 0-2 each ran one "
                                               "optimizer step and an evaluation batch on cpu")


def _trained_nothing(out, printed):
    """No epoch was trained: no record, no epoch line."""
    path = os.path.join(out, "metrics.jsonl")
    assert not os.path.exists(path) or read_records(out) == []
    assert "stage 0 epoch" not in printed


@pytest.mark.parametrize("overrides, fragment", [
    (["stages.2.data.image_size=30"], "stages.2: an image size of 30 px is not a multiple of "
                                      "the model's patch size 8"),
    (["stages.2.data.batch_size=33", "train.accum_steps=2"],
     "stages.2.data.batch_size=33 does not split into 1 rank(s) x train.accum_steps=2"),
    (["stages.2.warmup={steps: 5, start_lr: 1.0}"], "stages.2: stage 'fixres': warmup.start_lr"),
])
def test_a_later_stage_that_cannot_run_fails_before_the_first_epoch(tmp_path, overrides,
                                                                    fragment, capsys):
    out = str(tmp_path)
    with pytest.raises(UserError) as error:
        train(_cfg(out, *overrides))
    assert fragment in str(error.value)
    _trained_nothing(out, capsys.readouterr().out)


@pytest.mark.slow
def test_a_misnamed_trainable_in_stage_2_is_one_error_before_training(tmp_path):
    proc = run_script("main.py", "-c", CONFIG, *[a for o in SHORT for a in ("-o", o)],
                      "-o", f"train.output_dir={tmp_path}", "-o", "stages.2.trainable=[nosuch]")
    assert_one_error(proc, "'stages.2.trainable': 'nosuch' names no parameter")
    _trained_nothing(str(tmp_path), proc.stdout)


def test_a_kernel_that_fails_in_stage_2_stops_the_run_before_stage_0(tmp_path, monkeypatch,
                                                                     capsys):
    """What a missing GPU kernel looks like (Paddle's momentum without bfloat16): here the
    Momentum update raises, and only stage 2 uses Momentum."""
    def missing_kernel(*args, **kwargs):
        raise RuntimeError("(NotFound) The kernel with key (GPU, Undefined(AnyLayout), "
                           "bfloat16) of kernel `momentum` is not registered.")

    monkeypatch.setattr(paddle.optimizer.Momentum, "_append_optimize_op", missing_kernel)
    out = str(tmp_path)
    with pytest.raises(UserError) as error:
        train(_cfg(out, "stages.1.optimizer={name: AdamW, lr: 1.0e-3}",
                 "stages.2.optimizer={name: Momentum, lr: 1.0e-3}"))
    message = str(error.value)
    assert message.startswith("stages.2 (fixres) cannot train on cpu in float32: "
                              "RuntimeError: (NotFound) The kernel")
    assert "no stage has run" in message
    _trained_nothing(out, capsys.readouterr().out)
    # Nothing of a run is left: started again (with the fix) it is a new run.
    assert not {"config.yaml", "metrics.jsonl", "vdl", "last"} & set(os.listdir(out))
    folder = RunFolder(out)
    folder.hold(resume=False, overwrite=False)
    folder.release()
    # bf16 with O2 and Momentum: the message says so and offers the alternatives.
    cfg = _cfg(out, "train.amp=bf16", "train.amp_level=O2",
               "stages.2.optimizer={name: Momentum, lr: 1.0e-3}")
    hint = str(_failure(cfg, 2, RuntimeError("kernel"), "gpu:0", SimpleNamespace(mode="bf16")))
    assert "stages.2 (fixres) cannot train on gpu:0 in bf16 O2" in hint
    assert "train.amp_level=O1" in hint and "stages.2.optimizer.name=AdamW" in hint


@pytest.mark.slow
@pytest.mark.parametrize("names", [["head.bias"], ["pos_embed"]])
def test_a_stage_may_train_a_single_tensor(tmp_path, names):
    """A stage with nothing to decay (one bias, the position embedding) trains: Paddle's
    optimizers fail on an empty parameter group, so none is made."""
    cfg = _cfg(str(tmp_path), f"stages.2.trainable={names}")
    model = paddle.nn.Linear(2, 2)
    best = train(cfg)
    assert best is not None and len(read_records(str(tmp_path))) == 3
    model.weight.stop_gradient = True
    optimizer, _ = build_optimizer(cfg.stages[2], model, 1, cfg.train)
    assert len(optimizer._param_groups) == 1


@pytest.mark.slow
def test_a_resume_takes_corrections_of_stages_that_have_not_started(tmp_path, monkeypatch,
                                                                    capfd):
    corrected = ["stages.2.optimizer={name: AdamW, lr: 2.0e-3, weight_decay: 0.0}",
                 "stages.2.frozen_mode=train"]
    whole = str(tmp_path / "whole")
    train(_cfg(whole, *corrected))
    out = str(tmp_path / "stopped")
    position = stop_at_evaluation(_cfg(out), 1, monkeypatch)
    assert position == {"stage": 0, "epoch": 0, "micro": 4, "evaluating": True}
    with pytest.raises(UserError, match="'stages.0.optimizer.lr' differs"):
        train(_cfg(out, "stages.0.optimizer.lr=1.0e-3"), resume=True)
    capfd.readouterr()
    train(_cfg(out, *corrected), resume=True)
    assert "stages 2 differ from the checkpoint's config; they have not started" in \
        capfd.readouterr().out
    assert_same_run(whole, out, records=3, kinds=("raw", "ema"))


def test_which_stages_may_differ_on_resume():
    cfg = load_config(CONFIG)
    plain = to_plain(cfg)

    def changed(stage, **fields):
        other = to_plain(cfg)
        other["stages"][stage]["optimizer"]["lr"] = 0.5
        other["train"].update(fields)
        return other

    # At the start of stage 1 (stage 0 done): stages 1 and 2 may change, stage 0 may not.
    at_start = RunState(config=plain, position=Position(1))
    assert check_same_config(RunState(config=changed(1), position=Position(1)), cfg, "x") == [1]
    assert check_same_config(RunState(config=changed(2), position=Position(1)), cfg, "x") == [2]
    with pytest.raises(UserError, match="'stages.0.optimizer.lr' differs"):
        check_same_config(RunState(config=changed(0), position=Position(1)), cfg, "x")
    # Midway through stage 1 it is running: refused.
    with pytest.raises(UserError, match="'stages.1.optimizer.lr' differs"):
        check_same_config(RunState(config=changed(1), position=Position(1, 0, 3)), cfg, "x")
    # A stage added or removed after the running one: allowed; the same config: nothing.
    longer = dict(plain, stages=plain["stages"] + [plain["stages"][-1]])
    assert check_same_config(RunState(config=longer, position=Position(1)), cfg, "x") == [3]
    assert check_same_config(at_start, cfg, "x") == []
    # ... unless it moves an SWA that has begun (swa.stage -1: the last stage).
    swa = load_config(CONFIG, ["train.swa.enabled=true"])
    saved = to_plain(swa)
    saved["stages"] = saved["stages"][:2]
    with pytest.raises(UserError, match="train.swa.stage"):
        check_same_config(RunState(config=saved, position=Position(1, 0, 2)), swa, "x")
    # Outside the stages nothing may change (but the keys that change no result).
    with pytest.raises(UserError, match="'train.seed' differs"):
        check_same_config(RunState(config=changed(2, seed=3), position=Position(1)), cfg, "x")
    assert check_same_config(RunState(config=changed(2, check_stages=False),
                                      position=Position(1)), cfg, "x") == [2]


@pytest.mark.slow
def test_a_bad_stage_is_reported_by_preflight_too(tmp_path):
    proc = run_script("main.py", "-c", CONFIG, *[a for o in SHORT for a in ("-o", o)],
                      "-o", f"train.output_dir={tmp_path}", "-o", "stages.1.data.image_size=20",
                      "--preflight")
    assert_one_error(proc, "stages.1: an image size of 20 px")


@pytest.mark.slow
def test_the_check_counts_the_attention_and_says_where_the_plan_assumed_otherwise(
        tmp_path, monkeypatch):
    """Every attention call of the trial steps is counted (here PPIM's computation on the
    CPU, which the plan assumes too: no line); on a card of the plan's table an attention
    that is not fused where the plan sized it fused is one warning with both memories."""
    from models.attention import AttentionTally
    from planning import plan as planning
    from planning.plan import attention_disagreement, plan

    cfg = _cfg(str(tmp_path))
    check = check_stages(cfg, Precision("off", "cpu"))
    # 3 stages x (one training micro-batch of [x; x] + one evaluation batch) x 2 blocks
    assert check.attention.to_json() == {"calls": 12, "fused_calls": 0,
                                         "dtypes": {"float32": 12}, "unfused_reasons": ["CPU"]}
    assert not check.planned_fused
    assert attention_disagreement(cfg, "cpu", check.planned_fused, check.attention) is None

    monkeypatch.setattr(planning, "card_of", lambda device: "V100-16GB")
    unfused = AttentionTally()
    unfused.add("PPIM's", "float32", "float32 inputs outside autocast")
    line = attention_disagreement(cfg, "gpu:0", True, unfused)
    fused_gib = plan(cfg, attention_fused=True)["memory_bytes"]["V100-16GB"] / 2 ** 30
    unfused_gib = plan(cfg, attention_fused=False)["memory_bytes"]["V100-16GB"] / 2 ** 30
    assert unfused_gib > fused_gib
    assert line == (f"warning: attention not fused: float32 inputs outside autocast, on gpu:0; "
                    f"the plan (--dry-run) sized it fused: expect about {unfused_gib:.3g} GiB on "
                    f"this V100-16GB, not {fused_gib:.3g} GiB (python main.py --preflight "
                    f"measures it)")
    fused = AttentionTally()
    fused.add("fused kernel", "float16")
    assert attention_disagreement(cfg, "gpu:0", True, fused) is None
    assert attention_disagreement(cfg, "gpu:0", False, fused).startswith(
        "note: attention fused: 1 of 1 calls in float16 on gpu:0, where the plan (--dry-run) "
        "sized the attention matrix: expect about")
