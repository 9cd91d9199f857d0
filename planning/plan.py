"""The cost of a run from its config alone, in about a second on any machine: optimizer steps
and images per stage, the FLOPs and activation bytes of one training image, the memory one
GPU needs, whether it fits and the largest micro-batch that does, the hours on each GPU of
:mod:`planning.gpus` (training, validations and the final test; an estimate with a range),
and the disk. ``python main.py --dry-run --json`` prints it.

The model's sizes come from PPIM's own constructor, built under ``paddle.LazyGuard`` (its
parameters are declared, never allocated or drawn). Counts (:mod:`models.cost`, which the
size check of a model before it is built shares), for a ViT of width D, depth L,
H heads, MLP ratio r and T tokens (patches plus the class and distillation tokens):

- FLOPs of a forward pass (2 per multiply-add): the patch embedding, per block the qkv,
  q·kᵀ, attention·v, projection and MLP matmuls (2·(3TD² + 2T²D + TD² + 2rTD²)), the heads.
  A training image costs a forward and a backward (twice a forward) per R-Drop copy, one more
  forward per copy with recompute, and a teacher's forward; an evaluated image one forward.
- Activations held at the backward pass's peak, per block and copy: 19·T·D token values
  (norm inputs and outputs, q, k, v, the attention and projection outputs, the residuals,
  both MLP layers and the activation) and, unless the fused kernel computes attention, H·T²
  attention values twice (the softmax's output, and its gradient beside it during the
  backward pass) plus, with attention dropout, its output and one-byte mask. In float32 that
  is 1.58 GB per deit_b_distilled_384 training image: the process's peak that bench/memory.py
  measures on a CPU (1.575 GB), above the tensors alone (1.164 GB by Paddle's allocator) by
  about the per-block softmax gradient, which is an upper bound. Under AMP O1 the norms and the softmax stay in float32 (Paddle's
  black list) and the matmuls after them keep half-precision copies; under O2 everything is
  half; these are estimates from Paddle's AMP lists, not measured. With recompute: each
  block's input plus one block's worth.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Optional

import paddle

from data.formats import FORMATS
from data.loader import less_than_a_batch
from models.attention import AttentionTally
from models.cost import activation_bytes, forward_flops, state_bytes
from planning.gpus import (
    GPUS,
    RESERVED_BYTES,
    SOURCE,
    card_of,
    flop_rates,
    fused_attention_on,
    precision_on,
)
from training.optimizers import OPTIMIZERS
from training.recipe import StageLength, stage_data, stage_loss
from training.stage_check import StageCheck
from utils.errors import NotebookTerms, UserError
from utils.runtime.device import matmul_flop_rate, paddle_version
from utils.runtime.dist import is_main
from utils.schema import Config, DataConfig, ModelConfig

# A run that a CPU would train for longer than this is announced with a warning; below the
# work a CPU this fast does in that time, the CPU is not measured.
CPU_WARN_HOURS, FASTEST_CPU_FLOPS = 1.0, 5e12
# How each memory term is known.
MEMORY_BASIS = {
    "state": "counted: parameters x bytes of weights, gradients, optimizer state, averages",
    "activations": "float32: the count equals the process peak bench/memory.py measures on "
                   "a CPU (1.58 GB per deit_b_distilled_384 image; its tensors: 1.16 GB); AMP "
                   "and fused attention: estimated from Paddle's AMP lists and kernels",
    "teacher": "counted: a distillation teacher's float32 weights",
    "reserved": "estimate: 1 GiB for the CUDA context and the allocator",
    "data_parallel": "estimate: with several GPUs, DataParallel's fused copy of the gradients",
}


def model_shape(model_cfg: ModelConfig, image_size: Optional[int] = None) -> dict:
    """The sizes that set a ViT's cost: width, depth, heads, MLP width, patch, channels,
    tokens at ``image_size`` (the model's own when ``None``), classes, heads, parameters."""
    from models.build import IMAGENET_CLASSES, construct

    kwargs = dict(model_cfg.kwargs, class_dim=IMAGENET_CLASSES if model_cfg.head == "mlp"
                  else model_cfg.num_classes)
    with paddle.LazyGuard():
        net = construct(model_cfg.name, kwargs)
    if not all(hasattr(net, part) for part in ("patch_embed", "pos_embed", "blocks")):
        raise UserError(f"model {model_cfg.name!r} is not a ViT or DeiT: the plan counts "
                        f"PPIM's ViTs and DeiTs (a patch embedding and transformer blocks); "
                        f"--preflight measures any model")
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


def activation_plan(cfg: Config, stage_index: int, amp_level: Optional[str], fused: bool) -> int:
    """Bytes one training image of stage ``stage_index`` keeps for the backward pass (both
    R-Drop copies) in float32 (``amp_level`` ``None``) or under AMP, attention fused or not."""
    stage = cfg.stages[stage_index]
    data_cfg, loss_cfg = stage_data(cfg.data, stage), stage_loss(cfg.loss, stage)
    copies = 2 if loss_cfg.rdrop else 1
    return copies * activation_bytes(model_shape(cfg.model, data_cfg.image_size), cfg.model,
                                     amp_level, fused)


def _split_sizes(data_cfg, num_classes):
    """(training, test) images of the data, from its name or by listing its files (fast: no
    image is opened); ``(None, None)`` when the data is not here. Data a run would refuse
    (a bad layout, a ``data.val_split`` that leaves nothing to train on) is refused here with
    the run's message."""
    from data.dataset import check_holdout, run_splits

    if FORMATS[data_cfg.name].split_sizes:  # known without reading the data
        train, test = FORMATS[data_cfg.name].split_sizes
    elif data_cfg.path is None or not os.path.isdir(data_cfg.path):
        return None, None
    else:
        splits = run_splits(DataConfig(data_cfg, val_split=0), num_classes, 0)
        own_val = splits[1] is not splits[2]
        train = len(splits[0].labels) + (len(splits[1].labels) if own_val else 0)
        test = len(splits[2].labels)
    if data_cfg.val_split:
        check_holdout(data_cfg.val_split, train)
    return train, test


def plan(cfg: Config, version: Optional[tuple[int, int, int]] = None,
         attention_fused: Optional[bool] = None) -> dict:
    """The plan of ``cfg`` (a dict, JSON-ready): totals, and per stage the same keys. Per GPU:
    its precision, memory (and its parts), whether it fits, the hours (an estimate, and a
    range from the slowest to the fastest published rate). ``version``: the Paddle the run
    will use (this one by default), which decides the fused attention on a V100;
    ``attention_fused``: the attention as a run observed it, in place of Paddle's rule."""
    train_images, test_images = _split_sizes(cfg.data, cfg.model.num_classes)
    trained = None if train_images is None else train_images - cfg.data.val_split
    held_out = cfg.data.val_split or test_images
    on_card = {gpu: precision_on(gpu, cfg.train.amp) for gpu in GPUS}
    level = {gpu: None if on_card[gpu] == "off" else cfg.train.amp_level for gpu in GPUS}
    version = version or paddle_version()
    fused = {gpu: fused_attention_on(gpu, cfg.train.amp, cfg.model.fused_attention, version)
             if attention_fused is None else attention_fused for gpu in GPUS}
    kinds = 1 + cfg.train.ema.enabled + cfg.train.swa.enabled  # weights each validation scores
    stages = []
    for index, stage in enumerate(cfg.stages):
        data_cfg, loss_cfg = stage_data(cfg.data, stage), stage_loss(cfg.loss, stage)
        shape = model_shape(cfg.model, data_cfg.image_size)
        copies = 2 if loss_cfg.rdrop else 1
        flops = forward_flops(shape) * copies * (3 + cfg.model.recompute)
        if cfg.distill:
            flops += _teacher_flops(cfg, data_cfg.image_size)
        images = trained if data_cfg.train_subset is None or trained is None \
            else min(data_cfg.train_subset, trained)
        if images is not None and images < data_cfg.batch_size:  # the run's loader refuses it
            raise less_than_a_batch(images, data_cfg.batch_size)
        length = None if images is None else StageLength.of(stage, images // data_cfg.batch_size)
        steps = stage.steps or (None if length is None else length.steps)
        validated = None if length is None or held_out is None else \
            _validations(length, cfg.train.eval_every_steps) * kinds \
            * min(held_out, data_cfg.val_subset or held_out)
        activation = {gpu: copies * activation_bytes(shape, cfg.model, level[gpu], fused[gpu])
                      for gpu in GPUS}
        micro = data_cfg.batch_size // cfg.train.accum_steps
        entry = {"stage": index, "name": stage.name, "optimizer_steps": steps,
                 "images": None if steps is None else steps * data_cfg.batch_size,
                 "validated_images": validated, "image_size": data_cfg.image_size,
                 "micro_batch": micro, "flops_per_image": flops,
                 "eval_flops_per_image": forward_flops(shape),
                 "activation_bytes_per_image": activation, "fused_attention": fused}
        entry.update(_memory(cfg, stage, shape, activation, micro))
        work = None if validated is None or entry["images"] is None else \
            entry["images"] * flops + validated * entry["eval_flops_per_image"]
        entry.update(_hours(work, cfg.train.amp), flops=work)
        entry["upper_bound"] = any(v is not None for v in stage.until.values())
        stages.append(entry)
    known = all(s["images"] is not None for s in stages)
    test_flops = None if test_images is None else \
        2 * test_images * stages[-1]["eval_flops_per_image"]  # the best and the last weights
    final_test = None if test_flops is None else _hours(test_flops, cfg.train.amp)
    return {
        "paddle": ".".join(map(str, version)),
        "total_optimizer_steps": sum(s["optimizer_steps"] for s in stages) if known else None,
        "total_images": sum(s["images"] for s in stages) if known else None,
        "flops_per_image": max(s["flops_per_image"] for s in stages),
        "total_flops": sum(s["flops"] for s in stages) + test_flops
        if known and test_flops is not None else None,
        "activation_bytes_per_image": {gpu: max(s["activation_bytes_per_image"][gpu]
                                                for s in stages) for gpu in GPUS},
        "memory_bytes": {gpu: max(s["memory_bytes"][gpu] for s in stages) for gpu in GPUS},
        "data_parallel_extra_bytes": stages[0]["data_parallel_extra_bytes"],
        "fits": {gpu: all(s["fits"][gpu] for s in stages) for gpu in GPUS},
        **_total_hours(stages, final_test, known), "hours_source": SOURCE,
        "disk_bytes": _disk(cfg), "test_images": test_images, "stages": stages,
        "precision": on_card, "memory_basis": MEMORY_BASIS, "fixes": _fixes(cfg, stages, version),
        "teacher_flops_counted": not cfg.distill or _teacher_flops(cfg, None) > 0,
    }


def cpu_warning(cfg: Config, flop_rate: Callable[[], float]) -> Optional[str]:
    """A ``warning:`` line when ``cfg`` would train for more than :data:`CPU_WARN_HOURS` on
    a CPU that multiplies matrices at ``flop_rate()`` FLOP/s (training reaches less than
    that, so the hours are a lower bound), with the GPUs' estimates beside; else ``None``.
    The rate is measured only for a run that no CPU finishes within the hours; a model the
    plan cannot count gets no warning."""
    try:
        cost = plan(cfg)
    except UserError:
        return None
    if cost["total_flops"] is None or \
            cost["total_flops"] / FASTEST_CPU_FLOPS / 3600 < CPU_WARN_HOURS:
        return None
    flop_rate = flop_rate()
    hours = cost["total_flops"] / flop_rate / 3600
    if hours < CPU_WARN_HOURS:
        return None
    gpus = ", ".join(f"{gpu} about {cost['hours'][gpu]:.2g} h" for gpu in GPUS)
    return (f"warning: this run is {cost['total_flops'] / 1e15:,.0f} PFLOPs of work: at least "
            f"{hours:,.0f} h on this CPU ({flop_rate / 1e9:.0f} GFLOP/s measured on a matrix "
            f"product just now), against {gpus}; {NotebookTerms.stop} stops it")


def warn_if_cpu(cfg: Config, device: str) -> None:
    """Print :func:`cpu_warning` (rank 0, on a CPU): the GPU recipe started on a CPU by
    mistake learns its hours before any are spent."""
    if device == "cpu" and is_main():
        warning = cpu_warning(cfg, matmul_flop_rate)
        if warning:
            print(warning, flush=True)


def _fixes(cfg, stages, version):
    """Per GPU where a stage does not fit: the largest micro-batch that does, the
    ``train.accum_steps`` that brings every stage's micro-batch under it (the same images per
    step and hours; ``None`` when none does), and with ``model.recompute`` off, the cost of
    turning it on (memory, fits, hours)."""
    fixes, recompute = {}, None
    for gpu in GPUS:
        if all(s["fits"][gpu] for s in stages):
            continue
        batches = [(s["micro_batch"] * cfg.train.accum_steps, s["largest_micro_batch"][gpu])
                   for s in stages]
        accum = next((a for a in range(cfg.train.accum_steps, max(b for b, _ in batches) + 1)
                      if all(b % a == 0 and b // a <= largest for b, largest in batches)), None)
        fix = {"largest_micro_batch": min(largest for _, largest in batches),
               "accum_steps": accum, "recompute": None}
        if not cfg.model.recompute:
            recompute = recompute or plan(
                Config(cfg, model=ModelConfig(cfg.model, recompute=True)), version)
            fix["recompute"] = {key: recompute[key][gpu]
                                for key in ("memory_bytes", "fits", "hours")}
        fixes[gpu] = fix
    return fixes


def _validations(length: StageLength, every: int) -> int:
    """Validations a stage of ``length`` runs: one at each epoch's end, and with
    ``train.eval_every_steps`` one at every multiple of it inside an epoch."""
    inside = {step for step in range(every, length.steps, every)
              if step % length.steps_per_epoch} if every else set()
    return length.epochs + len(inside)


def _hours(flops, amp):
    """``hours`` and ``hours_range`` (low, high) per GPU for ``flops`` of training work
    (``None`` when unknown)."""
    rates = {gpu: flop_rates(gpu, amp) for gpu in GPUS}
    if flops is None:
        return {"hours": {gpu: None for gpu in GPUS}, "hours_range": {gpu: None for gpu in GPUS}}
    return {"hours": {gpu: flops / rates[gpu][1] / 3600 for gpu in GPUS},
            "hours_range": {gpu: [flops / rates[gpu][2] / 3600, flops / rates[gpu][0] / 3600]
                            for gpu in GPUS}}


def _total_hours(stages, final_test, known):
    """The stages' hours plus the final test's, per GPU (``None`` when a size is unknown)."""
    if not known or final_test is None:
        return {"hours": {gpu: None for gpu in GPUS}, "hours_range": {gpu: None for gpu in GPUS},
                "final_test_hours": None if final_test is None else final_test["hours"]}
    parts = [*stages, final_test]
    return {"hours": {gpu: sum(p["hours"][gpu] for p in parts) for gpu in GPUS},
            "hours_range": {gpu: [sum(p["hours_range"][gpu][i] for p in parts) for i in (0, 1)]
                            for gpu in GPUS},
            "final_test_hours": final_test["hours"]}


def _teacher_flops(cfg, image_size):
    """A teacher's forward pass at ``image_size``: counted for a ViT or DeiT, 0 for another
    PPIM model (a RegNet teacher, as in DeiT's paper), whose cost the plan cannot count."""
    try:
        return forward_flops(model_shape(_teacher_model(cfg), image_size))
    except UserError:
        return 0


def _teacher_params(cfg):
    """The teacher's parameter count (any PPIM model), for its weights' memory."""
    from models.build import construct

    teacher = _teacher_model(cfg)
    with paddle.LazyGuard():
        net = construct(teacher.name, dict(teacher.kwargs, class_dim=teacher.num_classes))
    return sum(int(math.prod(p.shape)) for p in net.parameters())


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
    return state_bytes(params, OPTIMIZERS[stage.optimizer.name].moments,
                       cfg.train.ema.enabled + cfg.train.swa.enabled,
                       half=precision != "off" and cfg.train.amp_level == "O2")


def _memory(cfg, stage, shape, activation, micro):
    """Per GPU, at the precision the run trains in there (``activation``: bytes per image per
    GPU): the bytes of this stage's step and their parts, whether they fit, the largest
    micro-batch that does, and what DataParallel adds on each of several GPUs."""
    teacher = _teacher_params(cfg) * 4 if cfg.distill else 0
    parts, memory, largest, data_parallel = {}, {}, {}, {}
    for gpu in GPUS:
        precision = precision_on(gpu, cfg.train.amp)
        parts[gpu] = {"state": _state_bytes(cfg, stage, shape["params"], precision),
                      "teacher": teacher, "reserved": RESERVED_BYTES,
                      "activations": micro * activation[gpu]}
        memory[gpu] = sum(parts[gpu].values())
        fixed = memory[gpu] - parts[gpu]["activations"]
        largest[gpu] = max(int((GPUS[gpu][0] - fixed) // activation[gpu]), 0)
        half = precision != "off" and cfg.train.amp_level == "O2"
        data_parallel[gpu] = shape["params"] * (2 if half else 4)
    return {"memory_bytes": memory, "memory_parts": parts,
            "fits": {gpu: memory[gpu] <= GPUS[gpu][0] for gpu in GPUS},
            "largest_micro_batch": largest, "data_parallel_extra_bytes": data_parallel}


def _disk(cfg):
    """Checkpoints (the resume checkpoint twice while one replaces the other) plus the best
    weights: float32 weights, optimizer state and averages."""
    shape = model_shape(cfg.model)
    moments = max(OPTIMIZERS[s.optimizer.name].moments for s in cfg.stages)
    averages = cfg.train.ema.enabled + cfg.train.swa.enabled
    checkpoint = shape["params"] * 4 * (1 + moments + averages)
    return 2 * checkpoint + shape["params"] * 4


def cost_lines(cost: dict) -> list[str]:
    """The plan in a few lines for people."""
    def gb(count: int) -> str:
        return f"{count / 2 ** 30:.3g} GiB"

    def hours(value: float, span: list[float]) -> str:
        return f"about {value:.3g} h ({span[0]:.3g}-{span[1]:.3g} h)"

    images = cost["total_images"]
    bound = " at most" if any(s["upper_bound"] for s in cost["stages"]) else ""
    lines = [f"cost:{bound} {cost['total_optimizer_steps']} optimizer steps, {images} images"
             if images is not None else "cost: the data is not here, so its size is unknown",
             f"  {cost['flops_per_image'] / 1e9:.3g} GFLOPs per training image; "
             f"disk {gb(cost['disk_bytes'])}"]
    for gpu in GPUS:
        lines.append(f"  {gpu}: {gb(cost['memory_bytes'][gpu])} "
                     f"({'fits' if cost['fits'][gpu] else 'does not fit'}; "
                     f"{gb(cost['activation_bytes_per_image'][gpu])} of activations an image)"
                     + (f", {hours(cost['hours'][gpu], cost['hours_range'][gpu])}"
                        if cost["hours"][gpu] is not None else ""))
        fix = cost["fixes"].get(gpu)
        if fix:
            lines.append(f"    fits with: micro-batches of at most {fix['largest_micro_batch']}"
                         + (f": -o train.accum_steps={fix['accum_steps']} (same images per "
                            f"step and hours)" if fix["accum_steps"] else "")
                         + (f"; or -o model.recompute=true: {gb(fix['recompute']['memory_bytes'])}"
                            f" ({'fits' if fix['recompute']['fits'] else 'does not fit'})"
                            + (f", about {fix['recompute']['hours']:.3g} h"
                               if fix["recompute"]["hours"] is not None else "")
                            if fix["recompute"] else ""))
    fallback = [gpu for gpu, mode in cost["precision"].items() if mode == "off"]
    if fallback and len(fallback) < len(cost["precision"]):  # bf16 where a card lacks it
        lines.append(f"  (bf16 falls back to float32 on {', '.join(fallback)}: sized and "
                     f"priced there as float32)")
    if not cost["teacher_flops_counted"]:
        lines.append("  (the teacher is not a ViT or DeiT: its forward passes are not in the "
                     "hours; --preflight measures them)")
    lines.append("  (memory: weights, optimizer state and a teacher counted; float32 activations "
                 "as measured on the CPU; AMP and fused-attention activations, the CUDA context "
                 "and DataParallel estimated: --preflight measures them)")
    lines.append(f"  (several GPUs: DataParallel adds about "
                 f"{gb(max(cost['data_parallel_extra_bytes'].values()))} on each)")
    lines.append(f"  (hours: training, validations and the final test; {cost['hours_source']}; "
                 f"the rates and their sources: planning/gpus.py)")
    return lines


def attention_disagreement(cfg: Config, device: str, planned: bool,
                           attention: AttentionTally) -> Optional[str]:
    """One line where the attention calls the stage check counted (``attention``) are not
    what the plan assumed on ``device`` (``planned``: fused), with what it means for memory
    on a card of the plan's table; ``None`` where they agree."""
    fused = attention.total > 0 and attention.fused == attention.total
    if fused == planned or not attention.total:
        return None
    card = card_of(device)
    memory = ""
    if card:
        assumed, observed = (plan(cfg, attention_fused=value)["memory_bytes"][card]
                             for value in (planned, fused))
        memory = (f": expect about {observed / 2 ** 30:.3g} GiB on this {card}, not "
                  f"{assumed / 2 ** 30:.3g} GiB (python main.py --preflight measures it)")
    if planned:
        return (f"warning: attention {attention.describe()}, on {device}; the plan "
                f"(--dry-run) sized it fused{memory}")
    return (f"note: attention {attention.describe()} on {device}, where the plan (--dry-run) "
            f"sized the attention matrix{memory}")


def report_attention(cfg: Config, device: str, check: StageCheck) -> None:
    """Print :func:`attention_disagreement` for what the stage check counted, if any."""
    line = attention_disagreement(cfg, device, check.planned_fused, check.attention)
    if line:
        print(line, flush=True)
