"""The trainer against an independent float64 NumPy implementation of the documented recipe
semantics: AdamW, then Momentum + L2 decay, linear warmup, polynomial decay, clipping by the
global norm over all parameters, gradient accumulation, decay exclusions and EMA warm-up.

Paddle serves only as the gradient oracle (the model's mean cross-entropy on the whole
accumulated batch, through Paddle's own ``cross_entropy``); every update rule is written
here from the formulas docs/recipe.md states.
"""

import os

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from safetensors.numpy import load_file

from data.preprocess import DevicePreprocess
from main import train
from models.build import build_model
from training import engine
from training.config import load_config

NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token")
STEPS_PER_EPOCH = 6  # 96 images / 16 per step = 6 steps of 2 micro-batches of 8


def _config(output_dir):
    return load_config("configs/demo.yaml", [
        f"train.output_dir={output_dir}", "data.train_subset=96", "data.val_subset=20",
        "data.batch_size=16", "data.val_split=0", "data.rotation=0.0", "data.hflip_prob=0.0", "model.drop_rate=0.0",
        "train.accum_steps=2", "train.clip_grad_norm=0.5",
        "train.ema={enabled: true, decay: 0.9, warmup: true}",
        "train.check_stages=false",  # its trial steps would be recorded as the run's batches
        "stages.0.epochs=2", "stages.0.warmup={steps: 3, start_lr: 1.0e-4}",
        "stages.0.optimizer={name: AdamW, lr: 3.0e-3, betas: [0.9, 0.99], epsilon: 1.0e-6, "
        "weight_decay: 0.05}",
        "stages.1.epochs=2", "stages.1.warmup={steps: 2, start_lr: 1.0e-3}",
        "stages.1.optimizer={name: Momentum, lr: 2.0e-2, momentum: 0.9, l2_decay: 1.0e-3}",
        "stages.1.lr_schedule={name: polynomial, end_lr: 1.0e-4, power: 2.0}"])


def _lr(stage, step, steps):
    """Linear warmup from start_lr, then polynomial decay over the remaining steps."""
    opt, warm, schedule = stage.optimizer, stage.warmup, stage.lr_schedule
    if step < warm.steps:
        return warm.start_lr + (opt.lr - warm.start_lr) * step / warm.steps
    if schedule.name == "constant":
        return opt.lr
    decay_steps = steps - warm.steps
    done = min(step - warm.steps, decay_steps)
    return (opt.lr - schedule.end_lr) * (1 - done / decay_steps) ** schedule.power + schedule.end_lr


class _GradientOracle:
    """Mean cross-entropy gradients of a float32 copy of the model at given weights."""

    def __init__(self, cfg):
        self.model = build_model(cfg.model, load_pretrained=False)
        self.preprocess = DevicePreprocess(32)

    def __call__(self, weights, images, labels):
        self.model.set_state_dict({k: paddle.to_tensor(v.astype(np.float32))
                                   for k, v in weights.items()})
        self.model.train()
        self.model.clear_gradients()
        logits = self.model(self.preprocess(paddle.to_tensor(images)))
        F.cross_entropy(logits, paddle.to_tensor(labels).reshape([-1, 1])).backward()
        return {name: p.grad.numpy().astype(np.float64)
                for name, p in self.model.named_parameters()}


def _reference(cfg, initial, micro_batches):
    """Train ``initial`` (float64) on the recorded micro-batches by the documented rules;
    return the final weights and their EMA."""
    oracle, train = _GradientOracle(cfg), cfg.train
    weights = {k: v.astype(np.float64) for k, v in initial.items()}
    ema, ema_updates = {k: v.copy() for k, v in weights.items()}, 0
    batches = iter(micro_batches)
    for stage in cfg.stages:
        opt, steps = stage.optimizer, stage.epochs * STEPS_PER_EPOCH
        first = {k: np.zeros_like(v) for k, v in weights.items()}
        second = {k: np.zeros_like(v) for k, v in weights.items()}
        for step in range(steps):
            parts = [next(batches) for _ in range(train.accum_steps)]
            grads = oracle(weights, np.concatenate([p[0] for p in parts]),
                           np.concatenate([p[1] for p in parts]))
            norm = np.sqrt(sum((g ** 2).sum() for g in grads.values()))
            scale = train.clip_grad_norm / max(norm, train.clip_grad_norm)
            lr = _lr(stage, step, steps)
            for name, grad in grads.items():
                grad = grad * scale
                p = weights[name]
                decayed = p.ndim > 1 and name.split(".")[-1] not in NO_DECAY_NAMES
                if opt.name == "AdamW":
                    b1, b2 = opt.betas
                    first[name] = b1 * first[name] + (1 - b1) * grad
                    second[name] = b2 * second[name] + (1 - b2) * grad ** 2
                    m_hat = first[name] / (1 - b1 ** (step + 1))
                    v_hat = second[name] / (1 - b2 ** (step + 1))
                    decay = lr * opt.weight_decay * p if decayed else 0.0
                    weights[name] = p - decay - lr * m_hat / (np.sqrt(v_hat) + opt.epsilon)
                else:
                    if decayed:
                        grad = grad + opt.l2_decay * p
                    first[name] = opt.momentum * first[name] + grad
                    weights[name] = p - lr * first[name]
            keep = min(train.ema.decay, (1 + ema_updates) / (10 + ema_updates))
            ema = {k: keep * ema[k] + (1 - keep) * weights[k] for k in ema}
            ema_updates += 1
    assert next(batches, None) is None  # every recorded micro-batch was used
    return weights, ema


@pytest.mark.slow
def test_training_equals_an_independent_implementation_of_the_recipe(tmp_path, monkeypatch):
    cfg = _config(str(tmp_path / "run"))
    seen, initial = [], {}
    real_step = engine.train_step

    def recording_step(stage, images, labels, *args):
        if not initial:
            initial.update({k: v.numpy().copy() for k, v in stage.model.state_dict().items()})
        seen.append((images.numpy().copy(), labels.numpy().copy()))
        return real_step(stage, images, labels, *args)

    monkeypatch.setattr(engine, "train_step", recording_step)
    train(cfg)
    assert len(seen) == 4 * STEPS_PER_EPOCH * cfg.train.accum_steps
    weights, ema = _reference(cfg, initial, seen)
    trained = load_file(os.path.join(cfg.train.output_dir, "last", "raw.safetensors"))
    averaged = load_file(os.path.join(cfg.train.output_dir, "last", "ema.safetensors"))
    assert set(trained) == set(weights)
    for name, expected in weights.items():
        moved = np.abs(expected - initial[name]).max()
        assert moved > 0, name
        np.testing.assert_allclose(trained[name], expected, rtol=0, atol=1e-3 * moved,
                                   err_msg=name)
        np.testing.assert_allclose(averaged[name], ema[name], rtol=0, atol=1e-3 * moved,
                                   err_msg=name)
