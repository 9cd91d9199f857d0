"""The optimizer and LR-schedule registries (training/optimizers/, training/schedules/): every
entry is a config section, a builder, a plan line and a memory count that agree with Paddle,
and SGD, added as one module, trains as its formula says."""

import types

import numpy as np
import paddle
import pytest

from planning.plan import plan
from training.config import load_config
from training.optim import build_optimizer
from training.optimizers import OPTIMIZERS
from training.recipe import describe_stage
from training.schedules import SCHEDULES
from training.stage_check import _failure
from utils.errors import UserError

DEMO = "configs/demo.yaml"


def _with_optimizer(section, *extra):
    return load_config(DEMO, [f"stages.0.optimizer={section}", "stages.0.lr_schedule={name: "
                              "constant}", "stages.0.warmup={steps: 0}", *extra])


def _model():
    paddle.seed(0)
    return paddle.nn.Linear(4, 3)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_optimizer_keeps_as_many_moments_per_weight_as_the_plan_counts(name):
    """``moments`` (the plan's memory) against the accumulators Paddle's optimizer made."""
    kind = OPTIMIZERS[name]
    cfg = _with_optimizer(f"{{name: {name}, lr: 0.01}}")
    model = _model()
    optimizer, _ = build_optimizer(cfg.stages[0], model, 10, cfg.train)
    model(paddle.ones([2, 4])).sum().backward()
    optimizer.step()
    weight = model.weight
    state = {key: value for key, value in optimizer.state_dict().items()
             if key.startswith(weight.name + "_") and list(value.shape) == list(weight.shape)}
    assert len(state) == kind.moments, (name, sorted(state))
    assert describe_stage(cfg, 0, 32).count(name) >= 1


def test_sgd_is_one_module_and_steps_by_its_formula_in_float64():
    cfg = _with_optimizer("{name: SGD, lr: 0.5, l2_decay: 0.1}", "train.exclude_from_decay=false")
    model = _model()
    w0 = model.weight.numpy().astype(np.float64)
    b0 = model.bias.numpy().astype(np.float64)
    optimizer, scheduler = build_optimizer(cfg.stages[0], model, 10, cfg.train)
    assert type(optimizer) is paddle.optimizer.SGD and scheduler is None
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 8
    model(paddle.to_tensor(x)).sum().backward()
    optimizer.step()
    grad_w = np.repeat(x.astype(np.float64).sum(axis=0)[:, None], 3, axis=1)  # d sum(xW+b)/dW
    np.testing.assert_allclose(model.weight.numpy(), w0 - 0.5 * (grad_w + 0.1 * w0), rtol=1e-6)
    np.testing.assert_allclose(model.bias.numpy(), b0 - 0.5 * (2.0 + 0.1 * b0), rtol=1e-6)


def test_sgd_has_no_optimizer_state_in_the_memory_plan():
    keys = ("{name: SGD, lr: 0.01}", "{name: AdamW, lr: 0.01}")
    plans = [plan(_with_optimizer(section, "stages.1.optimizer={name: SGD, lr: 0.01}"))
             for section in keys]
    params = plans[0]["params"] if "params" in plans[0] else None
    gap = plans[1]["memory_bytes"]["V100-16GB"] - plans[0]["memory_bytes"]["V100-16GB"]
    assert gap > 0 and (params is None or gap == 2 * 4 * params)


def test_a_wrong_key_of_a_registered_optimizer_names_its_valid_keys():
    with pytest.raises(UserError) as caught:
        _with_optimizer("{name: SGD, lr: 0.1, momentum: 0.9}")
    assert str(caught.value) == ("config key 'stages.0.optimizer.momentum' is unknown; valid "
                                 "keys at stages.0.optimizer: name, lr, l2_decay")


def test_the_bfloat16_advice_names_only_optimizers_whose_gpu_kernel_has_it():
    cfg = load_config(DEMO, ["train.amp=bf16", "train.amp_level=O2",
                             "stages.0.optimizer={name: Momentum, lr: 0.01}"])
    precision = types.SimpleNamespace(mode="bf16")  # as on a GPU with bfloat16
    error = _failure(cfg, 0, RuntimeError("kernel not registered"), "gpu:0", precision)
    text = str(error)
    assert "Paddle's GPU Momentum kernel has no bfloat16" in text
    assert "stages.0.optimizer.name=AdamW/SGD" in text


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_each_schedule_reaches_its_end_lr_after_the_stage(name):
    cfg = load_config(DEMO, [f"stages.0.lr_schedule={{name: {name}}}",
                             "stages.0.warmup={steps: 0}"])
    stage = cfg.stages[0]
    model = _model()
    optimizer, scheduler = build_optimizer(stage, model, 10, cfg.train)
    steps = stage.epochs * 10
    rates = [optimizer.get_lr()]
    for _ in range(steps):
        if scheduler is not None:
            scheduler.step()
        rates.append(optimizer.get_lr())
    end = stage.lr_schedule.get("end_lr", stage.optimizer.lr)
    assert rates[0] == pytest.approx(stage.optimizer.lr)
    assert rates[steps] == pytest.approx(end, abs=1e-12)
    assert SCHEDULES[name].describe(stage.lr_schedule) in describe_stage(cfg, 0, 32)
