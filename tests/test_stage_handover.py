"""What passes from one stage to the next: AMP O2's float32 master copies (taken before the
cast, carried to the next optimizer), averages of an O2 model, and an optimizer's state under
the names other optimizers built before it gave its parameters."""

from types import SimpleNamespace

import numpy as np
import paddle
from conftest import digit_batches, seeded_tiny_model

from data.preprocess import DevicePreprocess
from losses import RDropLoss
from training.amp import Precision
from training.averaging import EMA, SWA
from training.grads import apply_update, trainable
from training.optim import (
    MasterCopies,
    build_optimizer,
    master_copies,
    optimizer_state_for,
    portable_optimizer_state,
)
from utils.config import load_config
from utils.io.tensor_io import as_paddle, load_tensors, save_tensors

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
