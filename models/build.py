"""Build a PPIM DeiT/ViT with a new classification head and load pretrained weights; a model
the config describes is refused before it is built when it does not fit this machine (a
``model.kwargs`` whose sizes are each within their bounds can still multiply into terabytes,
or abort Paddle)."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable, Optional

import numpy as np
import paddle
import paddle.nn as nn
import ppim  # at import time, not in build_model: importing PPIM draws from Paddle's RNG
from ppim.models.common import DropPath as PPIMDropPath
from ppim.models.vit import Block

from models.attention import use_fused_attention
from models.cost import activation_bytes, declared_shape, state_bytes
from models.drop_path import DropPath
from models.heads import separate_heads
from models.recompute import RecomputedBlock
from models.resolution import backbone_of, extra_tokens, resample_pos_embed, set_resolution
from utils.errors import UserError
from utils.io.download import download_weights, weights_cached
from utils.io.tensor_io import load_state, load_tensors
from utils.schema import ModelConfig

# ImageNet classes of PPIM's pretrained heads, kept by the original's MLP head.
IMAGENET_CLASSES = 1000
# PPIM's classification heads (DeiT: class and distillation): sized by the class count.
CLASS_HEADS = ("head", "head_dist")


class MLPHeadClassifier(nn.Layer):
    """The original repo's head: the 1000-class model, then 1000→hidden→Tanh→Dropout→classes."""

    def __init__(self, backbone: paddle.nn.Layer, hidden: int, num_classes: int,
                 dropout: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc1 = nn.Linear(IMAGENET_CLASSES, hidden)
        self.act = nn.Tanh()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(self.backbone(x)))))


def check_model_size(name: str, kwargs: dict) -> None:
    """One :class:`UserError` with the estimate when training the model ``kwargs`` describe
    (each size within its bound, their product not) would take more than this machine's
    memory (:mod:`models.cost`: float32 weights, gradients and two optimizer moments, and one
    training image's activations, both R-Drop copies): ``embed_dim: 8192, mlp_ratio: 64`` is
    2 TB of state, ``patch_size: 1, img_size: 1024`` a million tokens (Paddle aborted the
    process on them)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no such figure here
        return
    shape = declared_shape(ppim_constructor(name), kwargs)
    state = state_bytes(shape["params"], moments=2)
    dropout = ModelConfig(attn_drop_rate=kwargs.get("attn_drop_rate", 0.0), recompute=False)
    activations = 2 * activation_bytes(shape, dropout, None, fused=False)
    if state + activations > memory:
        raise UserError(f"model.kwargs {kwargs} ask for about {state / 1e9:.1f} GB of weights, "
                        f"gradients and optimizer state and {activations / 1e9:.1f} GB of "
                        f"activations per training image, more than this machine's "
                        f"{memory / 1e9:.0f} GB; lower embed_dim, depth, mlp_ratio or the "
                        f"tokens (img_size / patch_size)")


def ppim_constructor(name: str) -> Callable:
    """PPIM's model constructor (function or class) called ``name``; one error otherwise."""
    constructor = getattr(ppim, name, None)
    if constructor is None or not callable(constructor) or name.startswith("_"):
        raise UserError(f"model.name {name!r} is not a PPIM model; try deit_b_distilled_384, "
                        f"deit_s_distilled, deit_b_384 or DistilledVisionTransformer")
    return constructor


def pretrained_url(name: str) -> str:
    """The ImageNet weights URL PPIM lists for constructor ``name``."""
    module = sys.modules[ppim_constructor(name).__module__]
    url = getattr(module, "urls", {}).get(name)
    if url is None:
        raise UserError(f"PPIM has no pretrained weights for model.name {name!r}; "
                        f"set model.pretrained to false or to a .pdparams path")
    return url


_SAID: set[str] = set()


def _say_once(line: Optional[str]) -> None:
    """Print ``line`` (if any) the first time this process builds a model that way: a run
    builds several (its model, the stage check's, the averages) and one line says it for all."""
    if line is not None and line not in _SAID:
        _SAID.add(line)
        print(line, flush=True)


def build_model(model_cfg: ModelConfig, load_pretrained: bool = True, amp: str = "off",
                image_size: Optional[int] = None, two_heads: bool = False) -> paddle.nn.Layer:
    """The model described by the ``model`` config section, with weights per ``model.pretrained``.

    ``num_classes`` sizes both the class head and, on distilled models, the
    distillation head (PPIM averages the two). ``load_pretrained=False`` skips
    the weights (evaluation loads a checkpoint instead). ``amp`` (the precision in
    effect) decides, with ``model.fused_attention``, whether attention is fused.
    ``image_size`` other than the model's own resamples its position embedding
    (:mod:`models.resolution`); weights from another resolution are resampled on load.
    ``two_heads`` keeps a distilled model's heads apart in training (distillation,
    :class:`models.heads.SeparateHeads`).
    """
    mlp = model_cfg.head == "mlp"
    kwargs = dict(
        class_dim=IMAGENET_CLASSES if mlp else model_cfg.num_classes,
        drop_rate=model_cfg.drop_rate,
        attn_drop_rate=model_cfg.attn_drop_rate,
        drop_path_rate=model_cfg.drop_path_rate,
    )
    kwargs.update(model_cfg.kwargs)
    backbone = construct(model_cfg.name, kwargs)
    if image_size:
        set_resolution(backbone, image_size)
    _swap_layers(backbone, PPIMDropPath, DropPath)
    if two_heads:
        separate_heads(backbone, model_cfg.name)
    _check_runs(backbone, model_cfg)
    _say_once(use_fused_attention(backbone, model_cfg.fused_attention, paddle.get_device(),
                                  amp, tokens=backbone.pos_embed.shape[1]))
    if model_cfg.recompute:
        count = _swap_layers(backbone, Block, RecomputedBlock)
        _say_once(f"recompute: {count} blocks recompute their activations in the backward pass")
    model = (MLPHeadClassifier(backbone, model_cfg.mlp_hidden, model_cfg.num_classes,
                               model_cfg.drop_rate) if mlp else backbone)
    if load_pretrained and model_cfg.pretrained:
        if model_cfg.pretrained is True:
            fix = ("download it where there is internet and pass -o model.pretrained=/path/to/"
                   "file.pdparams, or train from scratch with -o model.pretrained=false")
            path = download_weights(pretrained_url(model_cfg.name),
                                    f"PPIM's {model_cfg.name} ImageNet weights", fix)
        else:
            path = model_cfg.pretrained
        summary = load_weights(model, path)
        print(describe_load(path, summary), flush=True)
    if model_cfg.head_init == "zero" and load_pretrained:
        _zero_new_heads(backbone, summary["missing"] if model_cfg.pretrained else None)
    return model


@paddle.no_grad()
def _zero_new_heads(backbone, missing):
    """Start the class heads that no weights file filled (all when ``missing`` is ``None``)
    at zero, as the R-Drop authors' ViT fine-tuning does (``zero_head``): every class
    starts equally likely and the first updates come from the features alone."""
    zeroed = []
    for name in CLASS_HEADS:
        head = getattr(backbone, name, None)
        if isinstance(head, paddle.nn.Linear) and (
                missing is None or f"{name}.weight" in missing):
            head.weight.set_value(paddle.zeros_like(head.weight))
            head.bias.set_value(paddle.zeros_like(head.bias))
            zeroed.append(name)
    print(f"model.head_init=zero: {', '.join(zeroed) or 'no new head'} set to zero", flush=True)


def construct(name: str, kwargs: dict) -> paddle.nn.Layer:
    """PPIM's model ``name`` built with ``kwargs`` (no weights loaded: see
    :func:`_no_weight_loading`); one error when the arguments do not fit it, or ask for more
    memory than the machine has (:func:`check_model_size`: PPIM allocates its
    position embedding at once, even under ``paddle.LazyGuard``)."""
    check_model_size(name, kwargs)
    try:
        with _no_weight_loading(name):
            return ppim_constructor(name)(**kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise UserError(f"model.kwargs do not fit {name}: {exc}") from None


@contextlib.contextmanager
def _no_weight_loading(name):
    """PPIM's constructors load weights with ``paddle.load`` (plain pickle, which runs code)
    when asked to: while one builds, that is an error. Weights come through
    :func:`load_weights` only."""
    real = paddle.load

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise UserError(f"PPIM's {name} tried to load weights with paddle.load (plain pickle); "
                        f"pass them with model.pretrained instead, which is read without "
                        f"running code")

    paddle.load = refuse
    try:
        yield
    finally:
        paddle.load = real


def _swap_layers(model, old, new):
    """Give every layer of ``model`` whose type is exactly ``old`` the class ``new`` (a
    subclass: same parameters, same names, so weights load unchanged); return how many."""
    layers = [layer for layer in model.sublayers() if type(layer) is old]
    for layer in layers:
        layer.__class__ = new
    return len(layers)


def _check_runs(backbone, model_cfg):
    """One forward pass of a blank image, so that sizes that build but cannot run (a width
    the heads do not divide, a patch grid that does not tile) stop here, in one line."""
    size = backbone.patch_embed.img_size[0]
    backbone.eval()  # no dropout: nothing is drawn from the random stream
    try:
        with paddle.no_grad():
            backbone(paddle.zeros([1, 3, size, size]))
    except Exception as exc:  # noqa: BLE001 - Paddle raises many kinds for bad shapes
        message = " ".join(str(exc).split())[:200]
        raise UserError(f"model.name {model_cfg.name} with model.kwargs {model_cfg.kwargs} does "
                        f"not run ({type(exc).__name__}: {message}); check those sizes") from None
    finally:
        backbone.train()


def pending_download(model_cfg: ModelConfig,
                     load_pretrained: bool = True) -> Optional[tuple[str, str, str]]:
    """``(what, url, option)`` of the weights a build will download, or ``None``."""
    if not (load_pretrained and model_cfg.pretrained is True):
        return None
    url = pretrained_url(model_cfg.name)
    if weights_cached(url):
        return None
    return f"PPIM's {model_cfg.name} ImageNet weights", url, "-o model.pretrained=/path/to/"


def input_size(model: paddle.nn.Layer) -> int:
    """The square image side the model's patch embedding expects."""
    return backbone_of(model).patch_embed.img_size[0]


def load_weights(model: paddle.nn.Layer, path: str, strict: bool = False) -> dict:
    """Load the tensors of ``path`` (``.safetensors``, or ``.pdparams`` read without running
    code) that fit ``model``; report loaded, skipped and missing.

    A file of the bare PPIM model also loads into the MLP-head wrapper's
    backbone. The class heads may differ in shape (ImageNet's 1000 classes): they
    are skipped and keep the fresh initialisation. Any other tensor of another
    shape means the file is for another model: an error naming a few. With
    ``strict`` any skipped or missing tensor is an error.
    """
    state, _ = load_tensors(path)
    target = model
    backbone = backbone_of(model)
    if backbone is not model:
        own = set(model.state_dict())
        if sum(k in own for k in state) < sum(k in backbone.state_dict() for k in state):
            target = backbone
    expected = target.state_dict()
    loaded, skipped, resampled = {}, {}, []
    for key, value in state.items():
        if (key.endswith("pos_embed") and key in expected
                and list(value.shape) != list(expected[key].shape)
                and value.shape[-1] == expected[key].shape[-1]):  # another resolution
            tokens = extra_tokens(target)
            value = resample_pos_embed(value, tokens,
                                       int(round((expected[key].shape[1] - tokens) ** 0.5)))
            resampled.append(key)
        if key not in expected:
            skipped[key] = "not in the model"
        elif list(value.shape) != list(expected[key].shape):
            skipped[key] = f"shape {list(value.shape)} != model {list(expected[key].shape)}"
        else:
            loaded[key] = value
    broken = [key for key, value in loaded.items()
              if value.dtype.kind == "f" and not np.isfinite(value).all()]
    if broken:
        raise UserError(f"weights file {path} holds non-finite values ({len(broken)} tensors, "
                        f"e.g. {', '.join(broken[:3])}); it is damaged or from a diverged run")
    missing = [key for key in expected if key not in loaded]
    misfits = {k: why for k, why in skipped.items()
               if why.startswith("shape") and k.split(".")[0] not in CLASS_HEADS}
    if strict and (skipped or missing):
        problems = [f"{k}: {why}" for k, why in skipped.items()] + [f"{k}: missing" for k in missing]
        raise UserError(f"weights file {path} does not fit this model ({len(problems)} tensors "
                        f"differ, e.g. {'; '.join(problems[:3])}); check -c/-o match the "
                        f"training config")
    if misfits or not loaded:
        problems = misfits or skipped
        examples = "; ".join(f"{k}: {why}" for k, why in list(problems.items())[:3])
        raise UserError(f"weights file {path} is for another model ({len(problems)} tensors do "
                        f"not fit, e.g. {examples}); is it for another model.name or "
                        f"model.kwargs?")
    load_state(target, {**expected, **loaded})  # the full dict: no warning per new tensor
    return {"loaded": len(loaded), "skipped": skipped, "missing": missing, "resampled": resampled}


def describe_load(path: str, summary: dict) -> str:
    """One line summarising :func:`load_weights`."""
    skipped = "; ".join(f"{k}: {why}" for k, why in summary["skipped"].items())
    missing = ", ".join(summary["missing"])
    return (f"weights {path}: loaded {summary['loaded']} tensors, "
            f"skipped {len(summary['skipped'])}" + (f" ({skipped})" if skipped else "")
            + f", newly initialised {len(summary['missing'])}" + (f" ({missing})" if missing else "")
            + "".join(f"; {key} resampled to this resolution" for key in summary["resampled"]))
