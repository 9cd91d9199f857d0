"""``python main.py --preflight``: will this run fit, how fast is it, how long will it take?

With the run's own config: the data, the model and its weights, the precision and the
attention path exactly as the run would choose them; the run's start-of-run stage check
(:mod:`training.stage_check`); then, for each distinct stage setup
(micro-batch, accumulation, loss, optimizer), real optimizer steps through the stage's own
loader, one evaluation batch, and a checkpoint saved and loaded back in a temporary folder.
Prints a table (``--json``: one JSON line) with the step time, images per second, peak
memory, the projected time per epoch and for the whole recipe (its epoch caps or step
budgets), and the disk the checkpoints need; on a GPU of the plan's table the plan's rate
beside each measured one. A micro-batch that does not fit is halved until one does, and the
settings that keep the same global batch are printed (the report:
:mod:`planning.preflight_report`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import paddle

from data.batching import micro_batch
from data.dataset import eval_loader, run_splits, stage_loaders
from data.formats import FORMATS
from data.loader import loader_rate, set_epoch
from data.sources import Split
from models.build import pending_download as weights_download
from models.frozen import train_mode
from planning.plan import FASTEST_CPU_FLOPS, plan, report_attention
from planning.preflight_report import (
    activations_report,
    attention_report,
    human_seconds,
    plan_rates,
    project,
)
from training.amp import Precision
from training.engine import (
    STOP_AGREEMENT_BATCHES,
    evaluate,
    train_step,
    train_steps,
)
from training.grads import apply_update, trainable
from training.optim import portable_optimizer_state
from training.recipe import stage_data, stage_loss
from training.stage import RunModel, Stage, build_stage
from training.stage_check import TRIAL_IMAGES, check_stages, validate_stages
from training.state import EpochProgress, RunState, checkpoint_trees
from utils.checkpoint import load_last, save_last
from utils.errors import UserError, is_out_of_memory
from utils.io.download import ensure_downloadable
from utils.reports.progress import set_mode as set_progress
from utils.runtime.device import PeakMemory, matmul_flop_rate, peaks_reset, select_device
from utils.runtime.dist import any_rank, init, world_size
from utils.runtime.seeds import seed_everything

if TYPE_CHECKING:
    from utils.schema import Config

# Steps timed per setup: at least this many seconds of them (and at least MIN_STEPS), after
# one untimed step (kernels, caches, allocations).
TIMED_SECONDS, MIN_STEPS, MAX_STEPS = 3.0, 3, 50
# Seconds between progress lines while preflight works.
HEARTBEAT_S = 10
# What paddle.distributed.launch waits after its SIGTERMs before it SIGKILLs the ranks
# (distributed/launch: about 30 s).
LAUNCHER_GRACE_S = 30
# Preflight work a CPU takes longer than this for is announced with a warning first.
CPU_NOTICE_S = 60


def _setups(cfg):
    """The distinct stage setups: ``(batch, loss, optimizer name, resolution, trained
    parameters) -> stage indices``."""
    setups = {}
    for index, stage in enumerate(cfg.stages):
        data_cfg, loss_cfg = stage_data(cfg.data, stage), stage_loss(cfg.loss, stage)
        key = (data_cfg.batch_size, loss_cfg.rdrop, stage.optimizer.name, data_cfg.image_size,
               tuple(stage.trainable or ()))
        setups.setdefault(key, []).append(index)
    return setups


def _time_steps(stage: Stage, peaks: PeakMemory) -> tuple[float, Optional[int]]:
    """Seconds per optimizer step of ``stage``, and the bytes the steps held beyond what was
    allocated before them (``None`` where the allocator's peak cannot be reset)."""
    loader = stage.train_loader
    set_epoch(loader, 0)
    sampler = loader.batch_sampler
    accum = stage.accum_steps
    sampler.stop = min(sampler.full_length() // accum, MAX_STEPS + 1) * accum
    before = peaks.restart()
    times, last = [], time.perf_counter()
    for _ in train_steps(stage, loader, EpochProgress(), desc="preflight"):
        now = time.perf_counter()
        times.append(now - last)
        last = now
        if any_rank(len(times) > MIN_STEPS and sum(times[1:]) >= TIMED_SECONDS):
            break  # all ranks together: their steps exchange gradients
    if len(times) < 2:
        raise UserError(f"stage {stage.index} has fewer than 2 optimizer steps per epoch; "
                        f"preflight cannot time it")
    timed = times[1:]
    held = peaks.since_restart()
    return sum(timed) / len(timed), None if held is None else held - before


def _fits_alone(stage: Stage) -> bool:
    """Whether a micro-batch's forward and backward pass and an optimizer update of
    ``stage`` fit in this rank's memory, tried without a collective (gradients kept
    local): a rank out of memory inside one would leave the others waiting in it."""
    loader = stage.train_loader
    set_epoch(loader, 0)
    images, labels = next(iter(loader))
    model = stage.model
    try:
        train_mode(model, stage.frozen_eval)
        with model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext():
            train_step(stage, images, labels)
        # The run's own update: unscaled, clipped, skipped when not finite (a step on
        # loss-scaled fp16 gradients could blow the weights up before the timed steps).
        apply_update(stage.optimizer, trainable(model), stage.precision, stage.clip_norm)
        return True
    except Exception as exc:  # noqa: BLE001 - out of memory only
        if not is_out_of_memory(exc):
            raise
        return False
    finally:
        stage.optimizer.clear_grad()


def _fitting_accum(cfg: Config, stage_index: int, net: RunModel, splits: tuple[Split, Split],
                   device: str, peaks: PeakMemory) -> tuple[int, float, Optional[int], Stage]:
    """The smallest ``train.accum_steps`` whose micro-batch fits (the configured one first),
    with its step time, the bytes its steps held (:func:`_time_steps`) and its stage. Every
    rank tries each micro-batch alone first and the ranks decide
    together, so that they halve it (to the largest one that still divides a rank's share
    of the batch) at the same time; an out-of-memory among the timed steps, where the ranks
    exchange gradients, ends in one line with the setting to try."""
    batch = stage_data(cfg.data, cfg.stages[stage_index]).batch_size
    accum = cfg.train.accum_steps
    per_rank = micro_batch(batch, accum, world_size(),
                           f"stages.{stage_index}.data.batch_size") * accum
    while True:
        stage = build_stage(cfg, stage_index, net, splits, accum_steps=accum)
        failed = not _fits_alone(stage)
        try:
            if not any_rank(failed):
                return (accum, *_time_steps(stage, peaks), stage)
        except Exception as exc:  # noqa: BLE001 - out of memory only
            if not is_out_of_memory(exc):
                raise
            if world_size() > 1:
                raise UserError(f"stage {stage_index}: out of memory while the ranks "
                                f"exchanged gradients (micro-batch {per_rank // accum}), "
                                f"after it fit without; rerun with -o train.accum_steps="
                                f"{accum * 2} or -o model.recompute=true") from None
        net.model.clear_gradients()
        stage.release()  # frees the failed setup's optimizer and cached blocks
        half = per_rank // accum // 2
        larger = [a for a in range(accum + 1, per_rank + 1)
                  if per_rank % a == 0 and per_rank // a <= max(half, 1)]
        if not half or not larger:
            raise UserError(f"stage {stage_index}: not even a micro-batch of 1 image fits in "
                            f"memory on {device}; try -o model.recompute=true, -o "
                            f"train.amp=fp16, or a smaller data.image_size")
        accum = larger[0]


def _checkpoint_bytes(net: RunModel, stage: Stage, class_names: list) -> tuple[int, int]:
    """Bytes of a resume checkpoint (with ``stage``'s optimizer) and of the best weights,
    written and read back."""
    trees = checkpoint_trees(net.model, portable_optimizer_state(net.model, stage.optimizer),
                             net.averages, net.precision)
    with tempfile.TemporaryDirectory(prefix="preflight-") as folder:
        state = RunState(config={}, updates={kind: 0 for kind in net.averages})
        save_last(folder, trees, state.to_json(), class_names)
        load_last(os.path.join(folder, "last"))
        sizes = {name: os.path.getsize(os.path.join(folder, "last", name))
                 for name in os.listdir(os.path.join(folder, "last"))}
    return sum(sizes.values()), sizes["raw.safetensors"]


def preflight(cfg: Config) -> dict:
    """Measure the run of ``cfg``; return the report (a dict). One :class:`UserError` when
    the configured micro-batch does not fit (naming the settings that do)."""
    start = time.perf_counter()
    device = select_device(cfg.train.deterministic)
    set_progress("off")
    if not str(device).startswith("gpu"):
        print(f"preflight on {device}: no GPU here, so the times and memory below are this "
              f"machine's; the GPU estimates are in python main.py --dry-run", flush=True)
        duration = cpu_duration(cfg, matmul_flop_rate)
        if duration:
            print(duration, flush=True)
    ensure_downloadable([item for item in (
        FORMATS[cfg.data.name].download(cfg.data), weights_download(cfg.model)) if item])
    with heartbeat() as phase:
        return _preflight(cfg, device, start, phase)


def cpu_duration(cfg: Config, flop_rate: Callable[[], float]) -> Optional[str]:
    """Where preflight's steps of ``cfg`` would take this CPU (multiplying matrices at
    ``flop_rate()`` FLOP/s) more than :data:`CPU_NOTICE_S`: a ``warning:`` line with the
    least time they take, before they start; else ``None``. The rate is measured only for
    work that is more than a second on any CPU; a model the plan cannot count gets no
    line."""
    try:
        stages = plan(cfg)["stages"]
    except UserError:
        return None
    # The stage check's step of every stage (two micro-batches of its trial images), then per
    # setup the untimed fitting step, one more untimed and at least MIN_STEPS timed steps.
    work = sum(2 * TRIAL_IMAGES * stage["flops_per_image"] for stage in stages)
    for (batch, *_), indices in _setups(cfg).items():
        work += (2 + MIN_STEPS) * batch * stages[indices[0]]["flops_per_image"]
    if work / FASTEST_CPU_FLOPS < 1.0:  # a second on the fastest CPU: not worth measuring
        return None
    rate = flop_rate()
    seconds = work / rate
    if seconds < CPU_NOTICE_S:
        return None
    return (f"warning: preflight's training steps of this config are {work / 1e12:,.0f} TFLOPs "
            f"of work: at least {human_seconds(seconds)} on this CPU ({rate / 1e9:.0f} "
            f"GFLOP/s measured on a matrix product just now); Ctrl-C stops it")


@contextlib.contextmanager
def heartbeat(every: float = HEARTBEAT_S) -> Iterator[Callable[[str], None]]:
    """A line on standard error every ``every`` seconds while preflight works (one real step
    of the full model on a CPU can take minutes); yields a function that names the phase."""
    state = {"phase": "starting", "since": time.perf_counter()}
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every):
            print(f"preflight: {state['phase']} ({time.perf_counter() - state['since']:.0f} s "
                  f"so far)", file=sys.stderr, flush=True)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield lambda phase: state.update(phase=phase)
    finally:
        done.set()
        thread.join()


def _preflight(cfg: Config, device: str, start: float, phase: Callable[[str], None]) -> dict:
    """:func:`preflight` once the downloads are known to be there."""
    init()
    seed_everything(cfg.train.seed)
    phase("loading the data")
    train, val, test, class_names = run_splits(cfg.data, cfg.model.num_classes, cfg.train.seed)
    phase("building the model")
    precision = Precision(cfg.train.amp, device, cfg.train.amp_level)
    net = RunModel.for_run(cfg, precision)
    validate_stages(cfg, net.model, net.base_size, net.teacher)
    phase("the stage check")
    check = check_stages(cfg, precision, net.teacher, device=device)
    report_attention(cfg, device, check)
    report = {"device": str(device), "paddle": paddle.__version__, "ranks": world_size(),
              "precision": precision.mode if precision.mode != "off" else "float32",
              "attention": attention_report(cfg, check, device, precision),
              "recompute": cfg.model.recompute, "stage_check_s": check.seconds, "stages": []}
    fits, stage = True, None
    peaks = PeakMemory(device)  # what the run holds from here, not the check's peak
    for (batch, _, name, _, _), indices in _setups(cfg).items():
        phase(f"timing the steps of stage {indices[0]}")
        if stage is not None:
            stage.release()  # one setup's optimizer at a time, as in the run
        accum, step_s, step_bytes, stage = _fitting_accum(cfg, indices[0], net, (train, val),
                                                          device, peaks)
        fits = fits and accum == cfg.train.accum_steps
        micro = micro_batch(batch, accum, world_size())
        for index in indices:
            report["stages"].append({"stage": index, "batch_size": batch, "micro_batch": micro,
                                     "accum_steps": accum, "optimizer": name,
                                     "step_s": step_s, "train_images_per_s": batch / step_s})
            activations_report(cfg, report["stages"][-1], step_bytes,
                                report["attention"]["observed"]["fused_calls"] > 0, precision)
    phase("timing evaluation, the loader and a checkpoint")
    eval_s, eval_images = _time_eval(cfg, net, stage, val)
    report.update(_time_loader(cfg, (train, val), net.base_size))
    project(report, cfg, (train, val, test), eval_images / eval_s)
    checkpoint_start = time.perf_counter()
    last, best = _checkpoint_bytes(net, stage, class_names)
    checkpoint_s = time.perf_counter() - checkpoint_start
    stage.release()
    # last/ and, while it is replaced, last.partial/; the best weights beside them.
    report.update(checkpoint_bytes=last, disk_bytes=2 * last + best)
    peaks = peaks.overall()
    report.update(peak_memory_bytes=peaks["allocated"], peak_reserved_bytes=peaks["reserved"],
                  peak_includes_stage_check=not peaks_reset())
    first = report["stages"][0]
    report.update(step_s=first["step_s"], train_images_per_s=first["train_images_per_s"],
                  eval_images_per_s=eval_images / eval_s, fits=fits,
                  preflight_s=time.perf_counter() - start)
    # A stop request waits for the step under way (or, in a validation, up to the batches
    # between the ranks' agreements) and then for the checkpoint (written and read back here).
    eval_batch_s = (cfg.data.eval_batch_size or cfg.data.batch_size) * eval_s / eval_images
    report.update(stop_s=max(entry["step_s"] for entry in report["stages"]) + checkpoint_s
                  + STOP_AGREEMENT_BATCHES * eval_batch_s, launcher_grace_s=LAUNCHER_GRACE_S)
    plan_rates(report, cfg, device)
    return report


def _time_loader(cfg, splits, base_size):
    """What the host alone delivers to the first stage: images per second from its loader
    (configured workers, no model; after the first batch, which starts the workers) and the
    bytes per image."""
    data_cfg = stage_data(cfg.data, cfg.stages[0])
    loader, _ = stage_loaders(data_cfg, cfg.train.seed, cfg.train.accum_steps,
                              data_cfg.image_size or base_size, *splits)
    set_epoch(loader, 0)
    side = loader.dataset.size
    return {"loader_images_per_s": loader_rate(loader, TIMED_SECONDS),
            "host_bytes_per_image": side * side * 3, "num_workers": data_cfg.num_workers}


def _time_eval(cfg: Config, net: RunModel, stage: Stage, val: Split) -> tuple[float, int]:
    """Seconds and images of one evaluation batch (after an untimed one) at ``stage``'s
    resolution."""
    count = 2 * (cfg.data.eval_batch_size or cfg.data.batch_size)
    loader = eval_loader(val.take(slice(0, count)), cfg.data, stage.size)
    evaluate(net.model, stage.preprocess, loader, cfg.model.num_classes, desc="preflight",
             precision=net.precision)
    start = time.perf_counter()
    result = evaluate(net.model, stage.preprocess, loader, cfg.model.num_classes,
                      desc="preflight", precision=net.precision)
    return time.perf_counter() - start, result["num_samples"]
