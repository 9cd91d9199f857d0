"""What the notebook (main.ipynb) shows besides training: an error as one line whose advice
names the notebook's parameters instead of command-line options, and the results as a table.
"""

from __future__ import annotations

import json
import os
import re

from utils.errors import NotebookTerms

# Command-line options and the notebook parameters (first code cell) that set them.
PARAMETERS = {"data.path": "DATA_PATH", "train.output_dir": "OUTPUT_DIR"}
FLAGS = {"--overwrite": "OVERWRITE = True", "--resume": "RESUME = True", "-c": "CONFIG"}
PARAMETERS_CELL = "the first code cell (the parameters) and run all cells again"
# "[pass] -o key=value", ending before a space or the punctuation that closes a clause.
_OVERRIDE = re.compile(r"(\bpass )?-o ([A-Za-z_][\w.]*)=(\S*?)(?=[,;)]?(?:\s|$))")
_FLAG = re.compile(r"(\bpass )?(?<![\w-])(--overwrite|--resume|-c)(?![\w-])")


def in_notebook_terms(message: str) -> str:
    """``message`` with its command-line advice given as the notebook's parameters, and
    where to set them when it names one."""

    def override(match: re.Match) -> str:
        verb, key, value = "set " if match[1] else "", match[2], match[3]
        if key in PARAMETERS:
            return f'{verb}{PARAMETERS[key]} = "{value}"'
        return f'{verb}OVERRIDES += ["{key}={value}"]'

    def flag(match: re.Match) -> str:
        return ("set " if match[1] else "") + FLAGS[match[2]]

    text = _FLAG.sub(flag, _OVERRIDE.sub(override, message))
    for key, name in PARAMETERS.items():  # the key named alone: the parameter that sets it
        text = re.sub(rf"(?<![\w.]){re.escape(key)}(?![\w.=])", name, text)
    if text != message:
        text += f"; set it in {PARAMETERS_CELL}"
    return text


# Errors raised in a cell read in these terms once the notebook has imported this module.
NotebookTerms.advice = staticmethod(in_notebook_terms)
NotebookTerms.resume = f"set RESUME = True in {PARAMETERS_CELL}"


def results_table(output_dir: str) -> str:
    """A Markdown table of ``val.py``'s results in ``output_dir`` (the validation and the
    test split, whichever were evaluated): split, weights, top-1, top-5, loss, images."""
    from utils.io.tensor_io import record_of
    from utils.run_folder import RESULT_FILES

    rows = ["| split | weights | top-1 | top-5 | loss | images |", "|---|---|---|---|---|---|"]
    for split in ("val", "test"):
        path = os.path.join(output_dir, RESULT_FILES[split])
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as handle:
            report = json.load(handle)
        weights = f"`{os.path.relpath(report['weights'], os.path.abspath(output_dir))}`"
        kind = record_of(report["weights"]).get("kind")  # best weights: raw, EMA or SWA
        weights += f" ({kind})" if kind else ""
        rows.append(f"| {split} | {weights} | {report['top1']:.4f} | {report['top5']:.4f} | "
                    f"{report['loss']:.4f} | {report['num_samples']:,} |")
    return "\n".join(rows)
