"""Fine-tune a PPIM DeiT with R-Drop, stage by stage, as the YAML recipe says.

Examples:
  python main.py                                # the CIFAR-100 reproduction (GPU)
  python main.py -c configs/demo.yaml           # the CPU demo on bundled digits
  python main.py -o loss.rdrop=false            # the plain cross-entropy baseline
  python main.py -o stages.0.optimizer.lr=1e-4  # change one stage's learning rate
  python main.py --dry-run                      # print the resolved config and stage plan
"""

import argparse

from utils import cli
from utils.config import add_config_args, dump_config, load_config
from utils.optim import describe_stage, stage_data


def parse_args(argv=None):
    """Command-line options of the training entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and the stage plan, then exit "
                             "(loads no data and no weights)")
    return parser.parse_args(argv)


def print_plan(cfg):
    """The resolved config followed by one line per stage."""
    print(dump_config(cfg), end="")
    print("stage plan:")
    for index, stage in enumerate(cfg.stages):
        print("  " + describe_stage(index, stage, stage_data(cfg.data, stage)))


def main(argv=None):
    """Train (or, with ``--dry-run``, show what would be trained)."""
    args = parse_args(argv)
    cfg = load_config(args.config, args.override)
    if args.dry_run:
        print_plan(cfg)
        return 0
    from trainer import fit

    fit(cfg)
    return 0


if __name__ == "__main__":
    cli.run(main)
