"""Weight averages kept beside the model: EMA (every optimizer step) and SWA (every epoch).

Paddle's ``paddle.incubate.ModelAverage`` averages over a sliding window of steps
inside the optimizer and ``paddle.static.ExponentialMovingAverage`` is for static
graphs only, so neither gives a dygraph EMA with decay warm-up nor an equal-weight
average per epoch; both are a few lines here.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import paddle

from utils.io.tensor_io import load_state
from utils.schema import TrainConfig

FLOAT_TYPES = ("float16", "bfloat16", "float32", "float64")


def _is_float(tensor):
    return any(tensor.dtype == getattr(paddle, name) for name in FLOAT_TYPES)


def _float32(tensor):
    return tensor.detach().astype("float32").clone()


def _current(model, masters):
    """The model's weights, with the float32 master copies (AMP O2) in place of the
    half-precision parameters they stand for."""
    weights = model.state_dict()
    weights.update(masters or {})
    return weights


class WeightAverage:
    """A float32 copy of the model's floating-point tensors (half-precision ones under AMP
    O2 included), updated as an average of its weights.

    ``masters`` (state-dict path -> float32 tensor), where given, are averaged instead
    of the half-precision weights, which are their roundings."""

    def __init__(self, model: paddle.nn.Layer, masters: Optional[dict] = None) -> None:
        self.average = {key: _float32(value) for key, value in _current(model, masters).items()
                        if _is_float(value)}
        self.updates = 0

    @paddle.no_grad()
    def _blend(self, model, keep, masters=None):
        """average ← keep·average + (1 − keep)·weights."""
        for key, value in _current(model, masters).items():
            if key in self.average:
                self.average[key] = keep * self.average[key] + (1.0 - keep) * _float32(value)
        self.updates += 1

    def state_dict(self) -> dict:
        """The averaged tensors, loadable into the model."""
        return dict(self.average)

    def load(self, tensors: dict, updates: dict) -> None:
        """Restore a saved average and its update count."""
        self.average = {key: paddle.to_tensor(value) for key, value in tensors.items()}
        self.updates = updates


class EMA(WeightAverage):
    """Exponential moving average: ``decay`` per step, or ``min(decay, (1+t)/(10+t))`` with warm-up."""

    def __init__(self, model: paddle.nn.Layer, decay: float, warmup: bool,
                 masters: Optional[dict] = None) -> None:
        super().__init__(model, masters)
        self.decay = decay
        self.warmup = warmup

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    def update(self, model: paddle.nn.Layer, masters: Optional[dict] = None) -> None:
        """Fold the model's current weights in (call after each optimizer step)."""
        self._blend(model, self.current_decay(), masters)


class SWA(WeightAverage):
    """Stochastic weight averaging: the equal-weight mean of the weights at each epoch's end."""

    def update(self, model: paddle.nn.Layer, masters: Optional[dict] = None) -> None:
        """Add the model's current weights as one more equally weighted sample."""
        if self.updates == 0:
            self.average = {key: _float32(value)
                            for key, value in _current(model, masters).items()
                            if key in self.average}
            self.updates = 1
            return
        self._blend(model, self.updates / (self.updates + 1.0), masters)


def build_averages(train_cfg: TrainConfig, model: paddle.nn.Layer, updates: Optional[dict] = None,
                   trees: Optional[dict] = None,
                   masters: Optional[dict] = None) -> dict[str, WeightAverage]:
    """The averages ``train`` enables, restored from a checkpoint's tensors ``trees`` and
    their ``updates`` counts if given, else starting from the model's weights (or their
    float32 ``masters``)."""
    averages = {}
    if train_cfg.ema.enabled:
        averages["ema"] = EMA(model, train_cfg.ema.decay, train_cfg.ema.warmup, masters)
    if train_cfg.swa.enabled:
        averages["swa"] = SWA(model, masters)
    for kind, average in averages.items():
        if trees and kind in trees:
            average.load(trees[kind], updates[kind])
    return averages


@contextlib.contextmanager
def weights_in(model: paddle.nn.Layer, weights: dict) -> Iterator[paddle.nn.Layer]:
    """``model`` holding ``weights`` (an average's, or saved ones) inside the block, and its
    own weights again after it, however the block ends."""
    own = {key: value.detach().clone() for key, value in model.state_dict().items()}
    load_state(model, weights)
    try:
        yield model
    finally:
        model.set_state_dict(own)
