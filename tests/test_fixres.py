"""FixRes fine-tuning as a stage: the parameters a stage trains, a stage at another
resolution (model, averages, AMP O2 master copies, resume), test-time preprocessing."""

import os
from types import SimpleNamespace

import numpy as np
import paddle
import pytest
from conftest import (
    assert_same_run,
    final_tests,
    read_records,
    run_script,
    stop_at_evaluation,
    tiny_model_config,
)

from data.dataset import run_splits, stage_loaders
from data.loader import set_epoch
from main import train
from models.build import build_model, input_size
from models.resolution import resample_pos_embed
from training import stage as stage_module
from training.averaging import EMA
from training.config import load_config
from training.optim import MasterCopies, build_optimizer, master_copies
from training.recipe import stage_data
from training.stage import change_resolution, set_trainable
from utils.checkpoint import find_last, load_last
from utils.errors import UserError
from utils.io.tensor_io import load_tensors

CONFIG = "configs/demo_fixres.yaml"
SHORT = ["data.train_subset=256", "data.val_subset=100", "stages.0.epochs=1",
         "stages.1.epochs=1", "stages.2.epochs=2"]
FROZEN_AFTER = ("head.", "head_dist.", "norm.")


def _cfg(out, *extra):
    return load_config(CONFIG, [*SHORT, f"train.output_dir={out}", "train.progress=off", *extra])


@pytest.mark.slow
def test_a_fixres_stage_trains_only_its_parameters_at_the_test_resolution(tmp_path, monkeypatch):
    real_build, seen = stage_module.build_stage, {}

    def build_and_snapshot(*args, **kwargs):
        stage = real_build(*args, **kwargs)
        model = stage.net.model
        seen[stage.index] = ({k: v.numpy().copy() for k, v in model.state_dict().items()},
                             input_size(model), {k for k, p in model.named_parameters()
                                                 if not p.stop_gradient})
        return stage

    monkeypatch.setattr(stage_module, "build_stage", build_and_snapshot)
    out = str(tmp_path)
    train(_cfg(out))
    assert [seen[i][1] for i in range(3)] == [24, 24, 32]
    assert seen[2][2] == {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias",
                          "norm.weight", "norm.bias"}
    assert len(seen[0][2]) == len(seen[0][0])  # the other stages train everything
    start, end = seen[2][0], load_tensors(os.path.join(out, "last", "raw.safetensors"))[0]
    assert end["pos_embed"].shape == (1, 2 + 16, 64)
    for key, value in start.items():
        changed = not np.array_equal(end[key], value)
        assert changed == key.startswith(FROZEN_AFTER), key
    records = read_records(out)
    assert [(r["stage"], r["epoch"]) for r in records] == [(0, 1), (1, 1), (2, 1), (2, 2)]
    best = load_last(find_last(out))[0]["best"]
    assert best["stage"] == 2  # chosen only among validations at the last stage's 32 px
    tests = final_tests(out)
    assert tests["best"]["num_samples"] == 360
    # val.py evaluates at the last stage's resolution, as the final test did.
    proc = run_script("val.py", "-c", CONFIG, "-o", f"train.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"top1={tests['best']['test_top1']:.4f}" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("call,stage", [(4, 1), (5, 2)])
def test_a_run_stopped_before_or_after_the_resolution_change_resumes_to_the_same_records(
        tmp_path, monkeypatch, call, stage):
    whole = str(tmp_path / "whole")
    train(_cfg(whole))
    stopped = _cfg(str(tmp_path / "stopped"))
    # Evaluations: raw and EMA per epoch; call 4 is stage 1's EMA (at 24 px), call 5 is
    # stage 2's first (at 32 px).
    position = stop_at_evaluation(stopped, call, monkeypatch)
    assert position["stage"] == stage and position["evaluating"]
    train(stopped, resume=True)
    assert_same_run(whole, stopped.train.output_dir, 4, ("raw", "ema"))


def _o2(half):
    """What AMP O2 does to the weights, done by hand (Paddle casts on GPUs only)."""
    return SimpleNamespace(half_weights=True, prepare=lambda model: model.to(dtype=half))


def test_the_resolution_change_resamples_averages_and_the_o2_master_copy(tmp_path):
    paddle.seed(0)
    model = build_model(tiny_model_config())
    copies = MasterCopies(model, _o2("bfloat16"))
    old = model.pos_embed.name
    master = copies.by_name[old].numpy() + np.float32(1e-3)  # not a bfloat16 value
    copies.by_name[old] = paddle.to_tensor(master)
    ema = EMA(model, 0.9, False, copies.by_path())
    net = stage_module.RunModel(model, _o2("bfloat16"), copies, {"ema": ema}, 32)
    assert change_resolution(net, 48)
    assert not change_resolution(net, 48)
    want = resample_pos_embed(master, 2, 6)
    new = model.pos_embed
    assert input_size(model) == 48 and new.dtype == paddle.bfloat16 and list(new.shape) == \
        [1, 38, 64]
    assert old not in copies.by_name and copies.by_name[new.name].name == \
        f"{new.name}_fp32_master_0"
    assert np.array_equal(copies.by_path()["pos_embed"].numpy(), want)
    assert np.array_equal(new.astype("float32").numpy(),
                          paddle.to_tensor(want).astype("bfloat16").astype("float32").numpy())
    assert np.array_equal(ema.state_dict()["pos_embed"].numpy(), want)
    # A stage that trains the heads only: its optimizer holds their copies; the frozen
    # parameters' copies are carried on for the next stage.
    cfg = load_config("configs/demo.yaml", [f"train.output_dir={tmp_path}"])
    assert set_trainable(model, ["head", "head_dist"], 0) == (4, 35)
    optimizer, _ = build_optimizer(cfg.stages[0], model, 3, cfg.train, master_weights=True,
                                   masters=copies.by_name)
    assert len(optimizer._parameter_list[0]["params"]) + \
        len(optimizer._parameter_list[1]["params"]) == 4
    copies.carry(optimizer)
    assert new.name in copies.by_name and set(master_copies(optimizer)) <= set(copies.by_name)


@pytest.mark.slow
def test_trainable_names_must_name_parameters_and_be_a_list_of_names(tmp_path):
    model = build_model(tiny_model_config())
    with pytest.raises(UserError, match=r"'stages.2.trainable': 'heads' names no parameter.*"
                                        r"head_dist"):
        set_trainable(model, ["head", "heads"], 2)
    assert set_trainable(model, None, 0) == (35, 35)
    assert set_trainable(model, ["blocks.1"], 0)[0] == 12  # a prefix covers a whole block
    for bad, fragment in [("[]", "must list parameter names"), ("['']", "must list"),
                          ("head", "must be list")]:
        with pytest.raises(UserError, match=fragment):
            load_config(CONFIG, [f"stages.2.trainable={bad}"])
    proc = run_script("main.py", "-c", CONFIG, "-o", f"train.output_dir={tmp_path}",
                      *[a for o in SHORT for a in ("-o", o)], "-o", "stages.2.trainable=[haed]")
    assert proc.returncode == 2 and "'haed' names no parameter" in proc.stderr, proc.stderr[-800:]
    assert "Traceback" not in proc.stderr


def test_test_time_preprocessing_trains_on_the_stored_images(tmp_path):
    cfg = _cfg(str(tmp_path))
    train, val, _, _ = run_splits(cfg.data, 10, 0)
    for augment, same in ((False, True), (True, False)):
        data_cfg = stage_data(cfg.data, cfg.stages[2])
        data_cfg["train_augment"], data_cfg["train_subset"] = augment, None
        data_cfg["hflip_prob"] = 0.5
        loader, _ = stage_loaders(data_cfg, 0, 1, data_cfg.image_size, train, val)
        set_epoch(loader, 0)
        images, _ = next(iter(loader))
        stored = {img.tobytes() for img in train.images.images}
        hits = sum(img.tobytes() in stored for img in images.numpy())
        assert (hits == len(images)) == same, (augment, hits)


def test_with_ranks_a_stage_that_changes_what_trains_is_refused(monkeypatch):
    model = build_model(tiny_model_config())
    cfg = load_config(CONFIG, [])
    wrapped = object()
    net = _net(model, wrapped=wrapped)
    same, _ = stage_module.model_view(net, 1, cfg.stages[1], 32)
    assert same is wrapped  # nothing changed: the previous stage's wrapper is kept
    monkeypatch.setattr(stage_module, "world_size", lambda: 2)
    with pytest.raises(UserError, match="stage 2 changes the resolution or the trained"):
        stage_module.model_view(net, 2, cfg.stages[2], 32)


def _net(model, wrapped=None):
    """A :class:`RunModel` of ``model`` in float32, without averages or a teacher."""
    precision = SimpleNamespace(half_weights=False)
    return stage_module.RunModel(model, precision, MasterCopies(model, precision), {}, 32,
                                 wrapped=wrapped)


def _block_outputs(model, x):
    """The outputs of each transformer block in one forward pass of ``x``."""
    outputs = []
    hooks = [block.register_forward_post_hook(lambda layer, inputs, out: outputs.append(
        out.numpy().copy())) for block in model.blocks]
    model(x)
    for hook in hooks:
        hook.remove()
    return outputs


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_stage_with_frozen_blocks_runs_them_as_at_test_time(mode, capsys):
    """FixRes fits the head on the features evaluation gives it: the frozen blocks (and the
    dropout in front of them) run in eval mode, unless the stage says frozen_mode: train."""
    from models.frozen import train_mode
    from training.stage import random_layers

    paddle.seed(1)
    model = build_model(tiny_model_config(drop_rate=0.3, attn_drop_rate=0.2,
                                          drop_path_rate=0.2))
    cfg = load_config(CONFIG, [f"stages.2.frozen_mode={mode}"])
    stage_module.model_view(_net(model), 2, cfg.stages[2], 32)
    line = capsys.readouterr().out
    x = paddle.to_tensor(np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype("float32"))
    model.eval()
    expected = _block_outputs(model, x)
    train_mode(model, frozen_eval=mode == "eval")
    assert model.training and model.head.training  # the trained part stays in training
    got = [_block_outputs(model, x) for _ in range(2)]
    if mode == "eval":
        for outputs in got:
            assert all(np.array_equal(a, b) for a, b in zip(outputs, expected))
        assert not model.pos_drop.training and random_layers(model) == []
        assert "run as at test time" in line and "R-Drop's two copies are the same" in line
    else:  # dropout on: two passes differ, and neither is the eval one
        assert not np.array_equal(got[0][-1], got[1][-1])
        assert not np.array_equal(got[0][-1], expected[-1])
        assert len(random_layers(model)) > 0 and "keep dropout" in line
    # A stage that trains everything: everything in training mode.
    set_trainable(model, None, 0)
    train_mode(model)
    assert all(layer.training for layer in model.sublayers())


def test_a_trained_layer_keeps_the_dropout_that_feeds_it():
    """The original's MLP head: dropout between its two trained layers stays on when only the
    head trains; the frozen backbone runs in eval mode."""
    from models.frozen import train_mode

    model = build_model(tiny_model_config(head="mlp", drop_rate=0.3))
    set_trainable(model, ["fc1", "fc2"], 2)
    train_mode(model)
    assert model.drop.training and model.fc1.training
    assert not model.backbone.training and not any(
        layer.training for layer in model.backbone.sublayers())
