"""The project's functions, read as a newcomer reads them: public functions say their types,
no definition takes more than 7 parameters and no call passes more than 6 positionally (a
typed object or a config section travels instead)."""

import ast
import os
import subprocess

from conftest import ROOT

MAX_PARAMETERS, MAX_POSITIONAL = 7, 6


def _project_sources():
    """The project's Python files that git tracks, tests aside, with their parsed trees."""
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    for path in listed:
        if not path.startswith("tests/"):
            with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
                yield path, ast.parse(handle.read())


def _functions(tree):
    return [node for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _parameters(function):
    args = function.args
    named = args.posonlyargs + args.args + args.kwonlyargs
    if named and named[0].arg in ("self", "cls"):
        named = named[1:]
    return named + [arg for arg in (args.vararg, args.kwarg) if arg is not None]


def test_every_public_function_annotates_its_parameters_and_its_result():
    bare = [f"{path}:{node.lineno} {node.name}" for path, tree in _project_sources()
            for node in _functions(tree) if not node.name.startswith("_")
            and (node.returns is None
                 or any(arg.annotation is None for arg in _parameters(node)))]
    assert bare == []


def test_no_definition_takes_more_than_seven_parameters():
    wide = [f"{path}:{node.lineno} {node.name}" for path, tree in _project_sources()
            for node in _functions(tree) if len(_parameters(node)) > MAX_PARAMETERS]
    assert wide == []


def test_no_call_passes_more_than_six_positional_arguments():
    calls = [f"{path}:{node.lineno}" for path, tree in _project_sources()
             for node in ast.walk(tree) if isinstance(node, ast.Call)
             and sum(not isinstance(arg, ast.Starred) for arg in node.args) > MAX_POSITIONAL]
    assert calls == []
