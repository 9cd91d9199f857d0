"""Fine-tune a PPIM DeiT with R-Drop, stage by stage, as the YAML recipe says.

Examples:
  python main.py                                # the CIFAR-100 reproduction (GPU)
  python main.py -c configs/demo.yaml           # the CPU demo on bundled digits
  python main.py -o loss.rdrop=false            # the plain cross-entropy baseline
  python main.py -o stages.0.optimizer.lr=1e-4  # change one stage's learning rate
  python main.py --dry-run                      # print the resolved config and stage plan
  python main.py --dry-run --json               # the cost: steps, hours per GPU, memory, disk
  python main.py --preflight                    # measured here: fit, speed, time (GPU: a minute)
  python main.py --resume                       # continue after an interruption
  python main.py --overwrite                    # start again, the earlier run moved aside
  python main.py --init-from output/subset      # carry weights of an earlier run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Union

from training.config import load_config
from training.recipe import describe_run, describe_stage
from utils import cli
from utils.checkpoint import weights_path
from utils.cli import config_parser
from utils.config import dump_config, path_override
from utils.errors import Interrupted, UserError
from utils.runtime.invocation import resume_command
from utils.schema import Config


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options of the training entry point."""
    parser = config_parser(__doc__)
    fresh_or_not = parser.add_mutually_exclusive_group()  # continue, or start afresh
    fresh_or_not.add_argument("--resume", nargs="?", const=True, metavar="PATH",
                              help="continue an interrupted run exactly where its last "
                                   "checkpoint stands (default: train.output_dir; or an output "
                                   "dir / last/ folder)")
    parser.add_argument("--init-from", metavar="PATH",
                        help="start from weights of an earlier run (a .safetensors or .pdparams file, "
                             "or an output dir, whose best.safetensors is used); same as "
                             "-o model.pretrained=PATH")
    fresh_or_not.add_argument("--overwrite", action="store_true",
                              help="start afresh in a train.output_dir that holds an earlier "
                                   "run, after moving its contents aside to "
                                   "OUTPUT_DIR.old-<time>")
    parser.add_argument("--preflight", action="store_true",
                        help="measure this run on this machine before starting it: the stage "
                             "check, a few seconds of real steps of each stage setup, an "
                             "evaluation batch, the loader and a checkpoint round trip; prints "
                             "step time, memory, projected time and disk (on a GPU beside the "
                             "plan's estimate), then exits (2 when the micro-batch does not "
                             "fit, with settings that do). About a minute on a GPU; on a CPU "
                             "the real model takes many minutes, with a progress line every "
                             "10 s")
    parser.add_argument("--json", action="store_true",
                        help="with --preflight: print the report as one JSON line; with "
                             "--dry-run: the run's cost plan as one JSON document")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config, the stage plan and its cost (steps, "
                             "images, FLOPs, memory and hours per GPU, disk), then exit "
                             "(loads no data and no weights; in about a second)")
    return parser.parse_args(argv)


def print_plan(cfg: Config, as_json: bool = False) -> None:
    """The resolved config, one line per stage and the cost (:mod:`planning.plan`); with
    ``as_json`` the cost alone, as one JSON document."""
    from planning.plan import cost_lines, plan

    cost = plan(cfg)
    if as_json:
        print(json.dumps(cost, indent=2))
        return
    print(dump_config(cfg), end="")
    print("training: " + describe_run(cfg))
    print("stage plan:")
    for index in range(len(cfg.stages)):
        print("  " + describe_stage(cfg, index, cost["stages"][index]["image_size"]))
    print("\n".join(cost_lines(cost)))


def main(argv: Optional[list[str]] = None) -> int:
    """Train (or, with ``--dry-run``, show what would be trained; with ``--preflight``,
    measure it)."""
    args = parse_args(argv)
    overrides = list(args.override)
    if args.init_from:
        path = os.path.abspath(args.init_from)  # the same file wherever a resume runs from
        if os.path.isdir(path):
            path = weights_path(path, "best")
        overrides.append(path_override("model.pretrained", path))
    cfg = load_config(args.config, overrides)
    if cfg.train.deterministic:  # before Paddle is imported, which reads its flags then
        from utils.runtime.device import deterministic_environment

        deterministic_environment()
    if args.dry_run:
        print_plan(cfg, args.json)
        return 0
    if args.preflight:
        return run_preflight(cfg, args.json)
    command = resume_command("main.py", sys.argv[1:] if argv is None else argv)
    try:
        train(cfg, resume=args.resume, overwrite=args.overwrite, resume_with=command)
    except Interrupted as stop:
        raise Interrupted(stop.signum, f"{stop}; continue with: {command}") from None
    return 0


def train(cfg: Config, resume: Union[bool, str, None] = None, overwrite: bool = False,
          resume_with: Optional[str] = None) -> Optional[dict]:
    """The recipe: every stage of ``cfg``, then the final test; from a checkpoint with
    ``resume`` (True, or a run folder or ``last/`` path). ``resume_with``, the command that
    continues the run, is kept in its folder. Returns the best record (``None`` if no epoch
    was validated)."""
    # Imported here: --help and --dry-run answer without loading Paddle.
    from data.dataset import run_splits
    from data.samples import shipping_line
    from planning.plan import report_attention, warn_if_cpu
    from training.amp import Precision
    from training.epoch import train_one_epoch, validate
    from training.recipe import describe_stage, stage_data
    from training.run import training_run
    from training.stage import RunModel, build_stage
    from training.stage_check import check_stages

    # The device, the output folder, the checkpoint to resume, stop requests: the edges. On
    # a CPU, the hours of a GPU recipe started there by mistake come before anything else.
    with training_run(cfg, resume, overwrite, resume_with, on_device=warn_if_cpu) as run:
        if run.complete:
            return run.state.best
        # The reader: training, validation (held-out training images) and test splits.
        train_split, val_split, test_split, class_names = run_splits(
            cfg.data, cfg.model.num_classes, cfg.train.seed)
        # The model: PPIM's, with its pretrained weights (or the checkpoint's), its EMA /
        # SWA averages and a distillation teacher.
        precision = Precision(cfg.train.amp, run.device, cfg.train.amp_level)
        net = RunModel.for_run(cfg, precision, run.restored, run.state.updates)
        run.begin(net, (train_split, val_split, test_split), class_names)
        # One step of every stage still to run, on scratch weights, before hours are spent.
        if cfg.train.check_stages and run.start.stage < len(cfg.stages):
            check = check_stages(cfg, precision, net.teacher, run.start.stage, run.device)
            report_attention(cfg, run.device, check)  # where it is not what the plan sized
        with run.training():
            for index in range(run.start.stage, len(cfg.stages)):
                # The stage: its resolution and trained set, data, optimizer, schedule, loss.
                size = stage_data(cfg.data, cfg.stages[index]).image_size or net.base_size
                print(describe_stage(cfg, index, size), flush=True)
                stage = build_stage(cfg, index, net, (train_split, val_split))
                print(shipping_line(stage.train_loader.dataset, stage.data.num_workers),
                      flush=True)
                for segment in run.segments(stage):
                    if segment.trains:
                        train_one_epoch(stage, run, segment)
                    results = validate(stage, run, segment)
                    # The record, the best weights and the checkpoint of the next position.
                    if run.finish_epoch(stage, segment, results):
                        break
                stage.release()  # nothing of this stage's optimizer is left for the next
            # The best and the last weights on the test split, once.
            run.final_test(test_split)
    return run.state.best


def run_preflight(cfg: Config, as_json: bool) -> int:
    """Measure the run, print the report; an error line when the micro-batch does not fit.
    With ``as_json`` standard output holds the report alone, everything else goes to
    standard error."""
    import contextlib

    from planning.preflight_report import print_report
    from preflight import preflight

    report_out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        report = preflight(cfg)
    print_report(report, as_json, report_out)
    for entry in report["stages"]:
        if entry["accum_steps"] != cfg.train.accum_steps:
            configured = entry["batch_size"] // report["ranks"] // cfg.train.accum_steps
            raise UserError(
                f"a micro-batch of {configured} images (stage {entry['stage']}) does not fit in "
                f"memory on {report['device']}; {entry['micro_batch']} does: -o "
                f"train.accum_steps={entry['accum_steps']} keeps the {entry['batch_size']} "
                f"images per step" + ("" if cfg.model.recompute else
                                      ", or try -o model.recompute=true"))
    return 0


if __name__ == "__main__":
    with cli.one_line_errors():
        sys.exit(main())
