"""What the notebook (main.ipynb) adds to the commands: its parameters read as one run's
config, checked in the data cell (a wrong value is that cell's error, naming the parameter);
every error as one line whose advice names the parameters instead of command-line options;
the results as a table.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from data.dataset import data_path_problem
from data.formats import FORMATS
from training.config import load_config
from training.run import complete_run
from utils.config import path_override
from utils.errors import NotebookTerms, UserError
from utils.run_folder import fresh_start_problem
from utils.schema import Config
from utils.yaml_text import short

# Command-line options and the notebook parameters (first code cell) that set them.
PARAMETERS = {"data.path": "DATA_PATH", "train.output_dir": "OUTPUT_DIR"}
FLAGS = {"--overwrite": "OVERWRITE = True", "--resume": "RESUME = True", "-c": "CONFIG"}
STOP = "interrupting the kernel (the ■ button)"  # what Ctrl-C is in a terminal
PARAMETERS_CELL = "the first code cell (the parameters) and run all cells again"
# "[pass] -o key=value", ending before a space or the punctuation that closes a clause.
_OVERRIDE = re.compile(r"(\bpass )?-o ([A-Za-z_][\w.]*)=(\S*?)(?=[,;)]?(?:\s|$))")
_FLAG = re.compile(r"(\bpass )?(?<![\w-])(--overwrite|--resume|-c)(?![\w-])")


def in_notebook_terms(message: str) -> str:
    """``message`` with its command-line advice given as the notebook's parameters, and
    where to set them when it names one."""
    text = _translated(message)
    where = f"; set it in {PARAMETERS_CELL}" if text != message else ""
    return text.replace("Ctrl-C", STOP) + where


def _translated(message: str, keys: bool = True) -> str:
    """``message`` with its ``-o`` and flag advice as parameters (with ``keys``, a config key
    that a parameter sets, named alone, as that parameter too)."""

    def override(match: re.Match) -> str:
        verb, key, value = "set " if match[1] else "", match[2], match[3]
        if key in PARAMETERS:
            return f'{verb}{PARAMETERS[key]} = "{value}"'
        return f'{verb}OVERRIDES += ["{key}={value}"]'

    def flag(match: re.Match) -> str:
        return ("set " if match[1] else "") + FLAGS[match[2]]

    text = _FLAG.sub(flag, _OVERRIDE.sub(override, message))
    for key, name in PARAMETERS.items() if keys else ():  # a key alone: its parameter
        text = re.sub(rf"(?<![\w.]){re.escape(key)}(?![\w.=])", name, text)
    return text


def use_notebook_terms() -> None:
    """From now on, errors raised in a cell and the lines that say how to stop a run read in
    the notebook's terms."""
    NotebookTerms.advice = staticmethod(in_notebook_terms)
    NotebookTerms.resume = f"set RESUME = True in {PARAMETERS_CELL}"
    NotebookTerms.stop = STOP


use_notebook_terms()  # the notebook's data cell imports this module before anything else


class ParameterError(UserError):
    """An error traced to one parameter of the notebook: its message names it already."""

    def _render_traceback_(self) -> list[str]:
        return [f"error: {self}"]


@dataclass(frozen=True)
class Parameters:
    """The values of the notebook's parameters cell, named as there."""

    CONFIG: str
    OUTPUT_DIR: str
    OVERRIDES: Union[str, Sequence[str]]
    DATA_PATH: Optional[str]
    RESUME: bool
    OVERWRITE: bool

    def __post_init__(self) -> None:
        overrides = [self.OVERRIDES] if isinstance(self.OVERRIDES, str) else self.OVERRIDES
        accepted = {  # each parameter: whether its value is of its kind, and the kind in words
            "CONFIG": (isinstance(self.CONFIG, str), "a path in quotes"),
            "OUTPUT_DIR": (isinstance(self.OUTPUT_DIR, str), "a path in quotes"),
            "OVERRIDES": (isinstance(overrides, (list, tuple))
                          and all(isinstance(item, str) for item in overrides),
                          "a string or a list of strings"),
            "DATA_PATH": (self.DATA_PATH is None or isinstance(self.DATA_PATH, str),
                          "None or a path in quotes"),
            "RESUME": (isinstance(self.RESUME, bool), "True or False"),
            "OVERWRITE": (isinstance(self.OVERWRITE, bool), "True or False")}
        for name, (wanted, kind) in accepted.items():
            if not wanted:
                raise ParameterError(f"{name} = {short(getattr(self, name))} must be {kind}; "
                                     f"change it in {PARAMETERS_CELL}")

    def assignments(self) -> list[tuple[str, str]]:
        """``(parameter, -o assignment)`` of every override the parameters make, in the
        order they apply: ``OUTPUT_DIR``, the ``OVERRIDES`` entries, ``DATA_PATH``."""
        if isinstance(self.OVERRIDES, str):
            entries = [("OVERRIDES", self.OVERRIDES)]
        else:
            entries = [(f"OVERRIDES[{index}]", entry) for index, entry in
                       enumerate(self.OVERRIDES)]
        data = [] if self.DATA_PATH is None else [
            ("DATA_PATH", path_override("data.path", self.DATA_PATH))]
        return [("OUTPUT_DIR", path_override("train.output_dir", self.OUTPUT_DIR)), *entries,
                *data]

    @property
    def arguments(self) -> list[str]:
        """The command-line arguments of the same run (``-c CONFIG -o ...``)."""
        return ["-c", self.CONFIG, *[arg for _, assignment in self.assignments()
                                     for arg in ("-o", assignment)]]

    def config(self) -> Config:
        """The run's config, checked as far as the data cell can: the config and every
        override, the data ``DATA_PATH`` names, and ``OUTPUT_DIR`` free for this run (unless
        ``RESUME`` or ``OVERWRITE``). A problem is one error naming the parameter to
        change."""
        named = self.assignments()
        try:
            cfg = load_config(self.CONFIG, [assignment for _, assignment in named])
        except UserError as error:
            raise self._traced(named, error) from None
        problem = data_path_problem(cfg.data)
        if problem:
            setters = [name for name, assignment in named
                       if assignment.partition("=")[0] == "data.path"]
            raise ParameterError(self._data_blamed(setters[-1] if setters else "CONFIG",
                                                   cfg.data.path, problem))
        if not (self.RESUME or self.OVERWRITE) and complete_run(cfg.train.output_dir,
                                                                 cfg) is None:
            problem = fresh_start_problem(cfg.train.output_dir)
            if problem:
                raise UserError(problem)
        return cfg

    def _traced(self, named: list[tuple[str, str]], error: UserError) -> ParameterError:
        """``error`` of the whole config, traced to the first parameter that makes it: the
        config alone, then with each override added in turn."""
        for count in range(len(named) + 1):
            try:
                load_config(self.CONFIG, [assignment for _, assignment in named[:count]])
            except UserError as first:
                return ParameterError(self._blamed(
                    "CONFIG" if count == 0 else named[count - 1][0], str(first)))
        return ParameterError(self._blamed("CONFIG", str(error)))

    def _data_blamed(self, name: str, path: str, problem: str) -> str:
        """The data ``problem`` (:func:`data_path_problem`) of ``path`` as the error of the
        parameter ``name`` that set it: ``DATA_PATH``, an ``OVERRIDES`` entry or the config
        (where ``DATA_PATH`` is the fix)."""
        rest = _translated(problem[len(f"data.path {path} "):])
        if name == "DATA_PATH":
            return (f"DATA_PATH = {_shown(path)} {rest}; change "
                    f"DATA_PATH in {PARAMETERS_CELL}")
        if name == "CONFIG":
            return (f"CONFIG = {_shown(self.CONFIG)} reads its data "
                    f"from data.path {path}, which {rest}; set DATA_PATH in {PARAMETERS_CELL}")
        return self._blamed(name, f"data.path {path} {rest}")

    def _blamed(self, name: str, message: str) -> str:
        """``message`` as the error of parameter ``name``, with its value and where to change
        it."""
        values = {"CONFIG": self.CONFIG, "OUTPUT_DIR": self.OUTPUT_DIR,
                  "DATA_PATH": self.DATA_PATH, "OVERRIDES": self.OVERRIDES}
        index = re.fullmatch(r"OVERRIDES\[(\d+)\]", name)
        value = self.OVERRIDES[int(index[1])] if index else values[name]
        return (f"{name} = {_shown(value)}: "
                f"{_translated(message, keys=False).replace('Ctrl-C', STOP)}; "
                f"change {name} in {PARAMETERS_CELL}")


def _shown(value: object, limit: int = 200) -> str:
    """A parameter's value as it would be written in the cell, cut for an error line."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def data_line(cfg: Config) -> str:
    """Where the run's data is, in words, as the data cell announces it."""
    source = FORMATS[cfg.data.name].source(cfg.data)
    return f"data ({cfg.data.name}): {source or 'not here yet: the run downloads it'}"


def results_table(output_dir: str) -> str:
    """A Markdown table of ``val.py``'s results in ``output_dir`` (the validation and the
    test split, whichever were evaluated): split, weights, top-1, top-5, loss, images."""
    from utils.io.tensor_io import record_of
    from utils.reports.text import top5_text
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
        top5 = top5_text(report["top5"], "{:.4f}") or "–"
        rows.append(f"| {split} | {weights} | {report['top1']:.4f} | {top5} | "
                    f"{report['loss']:.4f} | {report['num_samples']:,} |")
    return "\n".join(rows)
