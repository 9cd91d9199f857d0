"""The cost of a run from its config alone, in about a second on any machine: optimizer steps
and images per stage, the FLOPs and activation bytes of one training image, the memory one
GPU needs, whether it fits and the largest micro-batch that does, the hours on each GPU of
:mod:`training.gpus`, and the disk. ``python main.py --dry-run --json`` prints it.

The model's sizes come from PPIM's own constructor, built under ``paddle.LazyGuard`` (its
parameters are declared, never allocated or drawn). Counts, for a ViT of width D, depth L,
H heads, MLP ratio r and T tokens (patches plus the class and distillation tokens):

- FLOPs of a forward pass (2 per multiply-add): the patch embedding, per block the qkv,
  q·kᵀ, attention·v, projection and MLP matmuls (2·(3TD² + 2T²D + TD² + 2rTD²)), the heads.
  A training image costs a forward and a backward (twice a forward) per R-Drop copy, one more
  forward per copy with recompute, and a teacher's forward.
- Activations kept for the backward pass, per block and copy: 19·T·D values (norm inputs and
  outputs, q, k, v, the attention and projection outputs, the residuals, both MLP layers and
  the activation) and 2.25·H·T² (the softmax's output, which its backward needs instead of
  the scores, the dropout's output and its one-byte mask); with recompute, each block's input
  plus one block's worth. 4 bytes each in float32, 2 under AMP (an approximation: O1 keeps
  the softmax in float32).
"""

from __future__ import annotations

import math
from typing import Optional

import paddle

from training.gpus import EFFICIENCY, GPUS, RESERVED_BYTES, peak_flops, precision_on
from training.recipe import StageLength, stage_data, stage_loss
from utils.schema import Config, ModelConfig

# Split sizes known from the data set's name: (training images, test images).
KNOWN_SPLITS = {"cifar100": (50_000, 10_000), "cifar10": (50_000, 10_000), "digits": (1437, 360)}
# Per block: 19 T·D values and 2.25 H·T² attention values (see the module's text).
TOKEN_VALUES, ATTENTION_VALUES = 19, 2.25


def model_shape(model_cfg: ModelConfig, image_size: Optional[int] = None) -> dict:
    """The sizes that set a ViT's cost: width, depth, heads, MLP width, patch, channels,
    tokens at ``image_size`` (the model's own when ``None``), classes, heads, parameters."""
    from models.build import IMAGENET_CLASSES, construct

    kwargs = dict(model_cfg.kwargs, class_dim=IMAGENET_CLASSES if model_cfg.head == "mlp"
                  else model_cfg.num_classes)
    with paddle.LazyGuard():
        net = construct(model_cfg.name, kwargs)
    patch = net.patch_embed.patch_size[0]
    size = image_size or net.patch_embed.img_size[0]
    extra = net.pos_embed.shape[1] - net.patch_embed.num_patches
    params = sum(int(math.prod(p.shape)) for p in net.parameters())
    if model_cfg.head == "mlp":
        params += (IMAGENET_CLASSES + 1) * model_cfg.mlp_hidden \
            + (model_cfg.mlp_hidden + 1) * model_cfg.num_classes
    return {"dim": net.embed_dim, "depth": len(net.blocks),
            "heads": net.blocks[0].attn.num_heads,
            "hidden": net.blocks[0].mlp.fc1.weight.shape[1], "patch": patch,
            "channels": net.patch_embed.proj.weight.shape[1],
            "tokens": (size // patch) ** 2 + extra, "classes": kwargs["class_dim"],
            "class_heads": 1 + hasattr(net, "head_dist"), "params": params}


def forward_flops(shape: dict) -> int:
    """FLOPs of one image's forward pass."""
    dim, tokens, patches = shape["dim"], shape["tokens"], shape["tokens"] - shape["class_heads"]
    block = 2 * (3 * tokens * dim * dim + 2 * tokens * tokens * dim + tokens * dim * dim
                 + 2 * tokens * dim * shape["hidden"])
    embed = 2 * patches * shape["patch"] ** 2 * shape["channels"] * dim
    return embed + shape["depth"] * block + 2 * dim * shape["classes"] * shape["class_heads"]


def activation_values(shape: dict, recompute: bool = False) -> int:
    """Values one copy of one image keeps for the backward pass."""
    dim, tokens = shape["dim"], shape["tokens"]
    block = TOKEN_VALUES * tokens * dim + ATTENTION_VALUES * shape["heads"] * tokens ** 2
    if recompute:
        return int(shape["depth"] * tokens * dim + block)
    return int(shape["depth"] * block)


def _split_sizes(data_cfg, num_classes):
    """(training, test) images of the data, from its name or by listing its files (fast: no
    image is opened); ``(None, None)`` when the data is not here."""
    if data_cfg.name in KNOWN_SPLITS:
        return KNOWN_SPLITS[data_cfg.name]
    try:
        from data.dataset import run_splits

        train, val, test, _ = run_splits(dict(data_cfg, val_split=0), num_classes, 0)
        return len(train.labels) + (len(val.labels) if val is not test else 0), len(test.labels)
    except Exception:  # noqa: BLE001 - the data is elsewhere: the plan says unknown
        return None, None


def plan(cfg: Config) -> dict:
    """The plan of ``cfg`` (a dict, JSON-ready): totals, and per stage the same keys."""
    train_images, test_images = _split_sizes(cfg.data, cfg.model.num_classes)
    trained = None if train_images is None else train_images - cfg.data.val_split
    stages, precision = [], cfg.train.amp
    on_card = {gpu: precision_on(gpu, precision) for gpu in GPUS}
    for index, stage in enumerate(cfg.stages):
        data_cfg, loss_cfg = stage_data(cfg.data, stage), stage_loss(cfg.loss, stage)
        shape = model_shape(cfg.model, data_cfg.image_size)
        copies = 2 if loss_cfg.rdrop else 1
        flops = forward_flops(shape) * copies * (3 + cfg.model.recompute)
        if cfg.distill:
            flops += forward_flops(model_shape(_teacher_model(cfg), data_cfg.image_size))
        images = trained if data_cfg.train_subset is None or trained is None \
            else min(data_cfg.train_subset, trained)
        steps = stage.steps or (None if images is None
                                else StageLength.of(stage, images // data_cfg.batch_size).steps)
        # Per precision: 4 bytes a value in float32, 2 in half precision.
        activation = {mode: copies * activation_values(shape, cfg.model.recompute)
                      * (4 if mode == "off" else 2) for mode in {precision, *on_card.values()}}
        micro = data_cfg.batch_size // cfg.train.accum_steps
        entry = {"stage": index, "name": stage.name, "optimizer_steps": steps,
                 "images": None if steps is None else steps * data_cfg.batch_size,
                 "image_size": data_cfg.image_size,
                 "micro_batch": micro, "flops_per_image": flops,
                 "activation_bytes_per_image": activation[precision]}
        entry.update(_memory(cfg, stage, shape, activation, micro))
        entry["hours"] = {gpu: None if entry["images"] is None else
                          entry["images"] * flops / (peak_flops(gpu, precision) * EFFICIENCY)
                          / 3600 for gpu in GPUS}
        entry["upper_bound"] = any(v is not None for v in stage.until.values())
        stages.append(entry)
    known = all(s["images"] is not None for s in stages)
    return {
        "total_optimizer_steps": sum(s["optimizer_steps"] for s in stages) if known else None,
        "total_images": sum(s["images"] for s in stages) if known else None,
        "flops_per_image": max(s["flops_per_image"] for s in stages),
        "activation_bytes_per_image": max(s["activation_bytes_per_image"] for s in stages),
        "memory_bytes": {gpu: max(s["memory_bytes"][gpu] for s in stages) for gpu in GPUS},
        "fits": {gpu: all(s["fits"][gpu] for s in stages) for gpu in GPUS},
        "hours": {gpu: sum(s["hours"][gpu] for s in stages) if known else None for gpu in GPUS},
        "disk_bytes": _disk(cfg), "test_images": test_images, "stages": stages,
        "efficiency": EFFICIENCY, "precision": on_card,
    }


def _teacher_model(cfg):
    """A model section for the distillation teacher's sizes (a PPIM name), or the student's
    (a run folder: its config is elsewhere; the same model is assumed)."""
    name = cfg.distill.teacher
    if "/" in name or name.startswith("."):
        return cfg.model
    return ModelConfig(cfg.model, name=name, kwargs=dict(cfg.distill.kwargs), head="linear")


def _state_bytes(cfg, stage, params, precision):
    """Weights, gradients, optimizer state and averages of ``params`` parameters trained in
    ``precision``."""
    half = precision != "off" and cfg.train.amp_level == "O2"
    weights = params * (2 + 4 if half else 4)  # O2: half weights and float32 masters
    moments = 2 if stage.optimizer.name == "AdamW" else 1
    averages = cfg.train.ema.enabled + cfg.train.swa.enabled
    return weights + params * (2 if half else 4) + params * 4 * (moments + averages)


def _memory(cfg, stage, shape, activation, micro):
    """Per GPU, at the precision the run trains in there (``activation``: bytes per image by
    precision): the bytes of this stage's step, whether they fit, the largest micro-batch
    that does."""
    modes = {gpu: precision_on(gpu, cfg.train.amp) for gpu in GPUS}
    fixed = {gpu: _state_bytes(cfg, stage, shape["params"], modes[gpu]) + RESERVED_BYTES
             for gpu in GPUS}
    memory = {gpu: fixed[gpu] + micro * activation[modes[gpu]] for gpu in GPUS}
    largest = {gpu: max(int((GPUS[gpu][0] - fixed[gpu]) // activation[modes[gpu]]), 0)
               for gpu in GPUS}
    return {"memory_bytes": memory, "fits": {gpu: memory[gpu] <= GPUS[gpu][0] for gpu in GPUS},
            "largest_micro_batch": largest}


def _disk(cfg):
    """Checkpoints (the resume checkpoint twice while one replaces the other) plus the best
    weights: float32 weights, optimizer state and averages."""
    shape = model_shape(cfg.model)
    moments = max(2 if s.optimizer.name == "AdamW" else 1 for s in cfg.stages)
    averages = cfg.train.ema.enabled + cfg.train.swa.enabled
    checkpoint = shape["params"] * 4 * (1 + moments + averages)
    return 2 * checkpoint + shape["params"] * 4


def cost_lines(cost: dict) -> list[str]:
    """The plan in a few lines for people."""
    def gb(count: int) -> str:
        return f"{count / 2 ** 30:.3g} GiB"

    images = cost["total_images"]
    bound = " at most" if any(s["upper_bound"] for s in cost["stages"]) else ""
    lines = [f"cost:{bound} {cost['total_optimizer_steps']} optimizer steps, {images} images"
             if images is not None else "cost: the data is not here, so its size is unknown",
             f"  {cost['flops_per_image'] / 1e9:.3g} GFLOPs and "
             f"{gb(cost['activation_bytes_per_image'])} of activations per training image; "
             f"disk {gb(cost['disk_bytes'])}"]
    for gpu in GPUS:
        hours = cost["hours"][gpu]
        lines.append(f"  {gpu}: {gb(cost['memory_bytes'][gpu])} "
                     f"({'fits' if cost['fits'][gpu] else 'does not fit'})"
                     + (f", about {hours:.3g} h" if hours is not None else ""))
    fallback = [gpu for gpu, mode in cost["precision"].items() if mode == "off"]
    if fallback and len(fallback) < len(cost["precision"]):  # bf16 where a card lacks it
        lines.append(f"  (bf16 falls back to float32 on {', '.join(fallback)}: sized and "
                     f"priced there as float32)")
    lines.append(f"  (hours from published peak rates x {cost['efficiency']:g}; see "
                 f"training/gpus.py)")
    return lines
