"""training/stage.py: one stage setup for training, the stage check and preflight, released
when the stage ends; what passes from one stage to the next (AMP O2 master copies,
optimizer state); and how far below main.py a training step runs."""

import json
import os
from types import SimpleNamespace

import numpy as np
import paddle
import pytest
from conftest import HANG_S, digit_batches, run_script, seeded_tiny_model

from data.preprocess import DevicePreprocess
from losses import RDropLoss
from training.amp import Precision
from training.averaging import EMA, SWA
from training.config import load_config
from training.grads import apply_update, trainable
from training.optim import (
    MasterCopies,
    build_optimizer,
    master_copies,
    optimizer_state_for,
    portable_optimizer_state,
)
from utils.io.tensor_io import as_paddle, load_tensors, save_tensors

# The FixRes demo shortened: three stages (AdamW at 24 px, Momentum, a head-only AdamW at
# 32 px), each with its optimizer and loss.
FIXRES_SHORT = ["-c", "configs/demo_fixres.yaml", "-o", "data.train_subset=64", "-o",
                "data.val_subset=20", "-o", "stages.0.epochs=1", "-o", "stages.1.epochs=1",
                "-o", "stages.2.epochs=1"]


def _probe(tmp_path, name, *args, env=None):
    """What tests/stack_probe.py records while ``main.py ARGS`` runs."""
    out = str(tmp_path / f"{name}.json")
    proc = run_script(os.path.join("tests", "stack_probe.py"), out, *args, env=env, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out, encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def fixres_run(tmp_path_factory):
    """The probes of the short FixRes demo, trained with its stage check."""
    tmp = tmp_path_factory.mktemp("probe")
    return _probe(tmp, "run", *FIXRES_SHORT, "-o", f"train.output_dir={tmp / 'run'}")


def _training_steps(records):
    return [step for step in records["steps"]
            if not any(frame.startswith("training/stage_check.py") for frame in step["frames"])]


@pytest.mark.slow
def test_a_training_step_is_six_calls_below_main_py_in_four_files_at_most(fixres_run):
    steps = _training_steps(fixres_run)
    assert len(steps) == 3  # one optimizer per stage
    for step in steps:
        frames = step["frames"]
        assert frames[0] == "main.py:<module>" and frames[-1] == "training/grads.py:apply_update"
        assert len(frames) <= 6 and len({frame.split(":")[0] for frame in frames}) <= 4, frames
        assert "training/epoch.py:train_one_epoch" in frames


@pytest.mark.slow
def test_every_optimizer_and_loss_of_a_run_and_its_check_is_built_by_build_stage(fixres_run):
    built = fixres_run["built"]
    # Three stages, each built by the check and by the run: an optimizer and a loss each.
    assert sorted(item["what"] for item in built) == ["AdamW"] * 4 + ["Momentum"] * 2 + \
        ["RDropLoss"] * 6
    assert all("training/stage.py:build_stage" in item["frames"] for item in built)
    checked = [item for item in built if "training/stage_check.py:check_stages" in item["frames"]]
    assert len(checked) == 6


@pytest.mark.slow
def test_preflight_builds_its_stages_with_build_stage_too(tmp_path):
    records = _probe(tmp_path, "preflight", *FIXRES_SHORT, "--preflight", "--json")
    built = records["built"]
    assert len(built) >= 12  # the check's three stages and at least the three timed setups
    assert all("training/stage.py:build_stage" in item["frames"] for item in built)
    assert any("preflight.py:_fitting_accum" in item["frames"] for item in built)


@pytest.mark.slow
def test_nothing_of_the_check_or_an_earlier_stage_is_alive_when_a_stage_trains(fixres_run):
    """Paddle's optimizers sit in a reference cycle: with Python's automatic collection
    off, only the run's own collections free them, at the end of the check and of each
    stage."""
    for step in _training_steps(fixres_run):
        assert step["other_optimizers_alive"] == 0
        assert step["scratch_models_alive"] == 0


@pytest.mark.slow
def test_a_collection_at_the_first_step_of_each_optimizer_frees_almost_nothing(fixres_run):
    """Measured with Paddle's host allocator: what a garbage collection would still free at
    each optimizer's first step is at most a tenth of the model's weights (the check's
    leftovers and an earlier stage's AdamW moments would be 2-3 times them)."""
    steps = _training_steps(fixres_run)
    weights = steps[0]["parameter_bytes"]  # stage 0 trains every parameter
    assert weights > 0
    for step in steps:
        assert step["collection_frees_bytes"] <= 0.1 * weights, step


@pytest.mark.slow
def test_without_those_collections_the_probe_finds_the_optimizers_alive(tmp_path):
    """The probe itself: with ``gc.collect`` made a no-op the check's and the earlier
    stages' optimizers stay alive (so the test above can fail)."""
    site = tmp_path / "no_collect"
    site.mkdir()
    (site / "sitecustomize.py").write_text(  # the probe's own measurement keeps the real one
        "import gc\ngc.real_collect = gc.collect\ngc.collect = lambda *args: 0\n")
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    records = _probe(tmp_path, "leaky", *FIXRES_SHORT, "-o", f"train.output_dir={tmp_path}/run",
                     env={"PYTHONPATH": path})
    steps = _training_steps(records)
    assert all(step["other_optimizers_alive"] >= 1 for step in steps)
    # The probe's own collection at each first step frees what was left since the one
    # before: stage 0's AdamW moments (twice the weights) when stage 1 starts, stage 1's
    # Momentum velocity (once) when stage 2 does.
    freed = [step["collection_frees_bytes"] / steps[0]["parameter_bytes"] for step in steps]
    assert freed[1] > 1.5 and freed[2] > 0.5, freed


CLIP = 1.0


def _cfg(*overrides):
    return load_config("configs/demo.yaml", ["stages.0.warmup.epochs=0", *overrides])


def _o2(half):
    """What AMP O2 does to the weights, done by hand (Paddle casts on GPUs only)."""
    return SimpleNamespace(half_weights=True, prepare=lambda model: model.to(dtype=half))


def test_o2_master_copies_are_taken_before_the_cast_and_carried_to_the_next_optimizer(tmp_path):
    model = seeded_tiny_model()
    original = {p.name: p.numpy().copy() for p in model.parameters()}
    copies = MasterCopies(model, _o2("float16"))
    assert model.head.weight.dtype == paddle.float16
    assert set(copies.by_name) == set(original)
    for name, master in copies.by_name.items():  # the loaded values, not their roundings
        assert master.dtype == paddle.float32 and np.array_equal(master.numpy(), original[name])
        assert master.name == f"{name}_fp32_master_0"  # Paddle's name: its state follows it
    assert not np.array_equal(model.head.weight.astype("float32").numpy(),
                              original[model.head.weight.name])
    cfg = _cfg()
    first = dict(copies.by_name)
    for stage in cfg.stages:  # AdamW (constant LR), then Momentum (polynomial schedule)
        optimizer, _ = build_optimizer(stage, model, 3, cfg.train, master_weights=True,
                                       masters=copies.by_name)
        carried = master_copies(optimizer)
        assert set(carried) == set(first) and all(carried[n] is first[n] for n in first)
        assert copies.by_path(optimizer)["head.weight"] is first[model.head.weight.name]
        copies.carry(optimizer)
    # A resumed run takes them from the checkpoint's optimizer state, under its own names.
    saved = str(tmp_path / "optimizer.safetensors")
    save_tensors(saved, portable_optimizer_state(model, optimizer))
    again = seeded_tiny_model()
    resumed = MasterCopies(again, _o2("float16"), as_paddle(load_tensors(saved)[0]))
    assert np.array_equal(resumed.by_path()["head.weight"].numpy(),
                          original[model.head.weight.name])
    assert set(resumed.by_name) == {p.name for p in again.parameters()}
    assert all(t.name == f"{n}_fp32_master_0" for n, t in resumed.by_name.items())
    assert MasterCopies(seeded_tiny_model(), Precision()).by_path() == {}  # float32: nothing kept
    assert build_optimizer(cfg.stages[0], model, 3, cfg.train)[0].state_dict().get(
        "master_weights") is None


def test_averages_of_an_o2_model_average_the_master_copies():
    model = seeded_tiny_model()
    copies = MasterCopies(model, _o2("bfloat16"))
    path, name = "head.weight", model.head.weight.name
    values = [np.full(model.head.weight.shape, v, dtype=np.float32) for v in (1.001, 1.003)]
    model.head.weight.set_value(paddle.to_tensor(values[0]).astype("bfloat16"))
    assert np.all(model.head.weight.astype("float32").numpy() == 1.0)  # bfloat16 rounds to 1
    masters = []
    for value in values:
        copies.by_name[name] = paddle.to_tensor(value)
        masters.append({path: copies.by_path()[path]})
    swa, ema = SWA(model, masters[0]), EMA(model, 0.5, False, masters[0])
    rounded = SWA(model)
    for master in masters:
        swa.update(model, master)
        ema.update(model, master)
        rounded.update(model)
    np.testing.assert_allclose(swa.state_dict()[path].numpy(), 1.002, rtol=1e-6)
    np.testing.assert_allclose(ema.state_dict()[path].numpy(), 1.002, rtol=1e-6)
    assert np.all(rounded.state_dict()[path].numpy() == 1.0)  # what averaging the weights gives


def test_a_stage_optimizer_state_loads_whatever_optimizers_the_process_built_before(tmp_path):
    """The reproduction's stages 0 and 1 are both AdamW: a run resumed inside stage 1
    builds one optimizer where the original process built two, and must still load the
    stage-1 state it saved."""
    model, (images, labels) = seeded_tiny_model(), digit_batches(1)[0]
    cfg = _cfg("stages.1.optimizer={name: AdamW, lr: 1.0e-3, weight_decay: 0.05}")
    loss = RDropLoss(alpha=1.0)

    def step(optimizer):
        parts = loss(model(DevicePreprocess(32)(paddle.concat([images, images]))), labels)
        parts["loss"].backward()
        apply_update(optimizer, trainable(model), Precision(), CLIP)
        optimizer.clear_grad()

    for stage in cfg.stages:
        optimizer, _ = build_optimizer(stage, model, 4, cfg.train)
        step(optimizer)
    saved = str(tmp_path / "optimizer.safetensors")  # the checkpoint: a copy, on disk
    save_tensors(saved, portable_optimizer_state(model, optimizer))
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    step(optimizer)
    expected = model.head.weight.numpy().copy()
    model.set_state_dict(weights)
    resumed, _ = build_optimizer(cfg.stages[1], model, 4, cfg.train)
    resumed.set_state_dict(optimizer_state_for(model, as_paddle(load_tensors(saved)[0])))
    step(resumed)
    assert np.array_equal(model.head.weight.numpy(), expected)


def test_a_released_stage_frees_its_gradients():
    """clear_grad() keeps zero-filled gradients allocated; a stage's release frees them, so
    the parameters a later head-only stage freezes hold no gradient through it."""
    from training.engine import train_steps
    from training.stage import RunModel, build_stage
    from training.stage_check import _synthetic_batches
    from training.state import EpochProgress
    from utils.runtime.device import allocated_bytes

    cfg = load_config("configs/demo.yaml")
    net = RunModel.scratch(cfg, Precision())
    stage = build_stage(cfg, 0, net)
    steps = list(train_steps(stage, _synthetic_batches(1, 4, 32, 10), EpochProgress(), desc="x"))
    assert [step.status for step in steps] == ["applied"]
    params = net.model.parameters()
    assert all(p.grad is not None for p in params if not p.stop_gradient)  # zeros, allocated
    before = allocated_bytes("cpu")
    stage.release()
    assert all(p.grad is None for p in params)
    gradients = sum(int(np.prod(p.shape)) * 4 for p in params if not p.stop_gradient)
    assert before - allocated_bytes("cpu") >= gradients


def test_preflights_trial_step_is_the_runs_update_and_skips_a_nonfinite_one(monkeypatch):
    """Preflight's first, untimed step goes through the run's update (unscale, clip, skip):
    non-finite gradients leave the weights as they were instead of stepping on them."""
    import preflight
    from data.dataset import run_splits
    from training.stage import RunModel, build_stage

    cfg = load_config("configs/demo.yaml", ["data.train_subset=64"])
    train, val, _, _ = run_splits(cfg.data, cfg.model.num_classes, 0)
    net = RunModel.scratch(cfg, Precision())
    stage = build_stage(cfg, 0, net, (train, val))

    def nonfinite_step(stage, images, labels, *args):
        sum((p * float("nan")).sum() for p in trainable(stage.model)).backward()

    monkeypatch.setattr(preflight, "train_step", nonfinite_step)
    before = {p.name: p.numpy().copy() for p in net.model.parameters()}
    assert preflight._fits_alone(stage)
    assert all(np.array_equal(p.numpy(), before[p.name]) for p in net.model.parameters())
    stage.release()
