"""The front pages and docs/: every relative link resolves, the front pages stay short, and
the English and Chinese front pages quote the same commands and numbers."""

import ast
import glob
import os
import re
import subprocess

import pytest
from conftest import ROOT

FRONT_PAGES = ("README.md", "README_cn.md")
PAGES = FRONT_PAGES + tuple(os.path.relpath(p, ROOT)
                            for p in sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))))
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")
NUMBER = re.compile(r"(?<![\w.])[-−]?\d+(?:,\d{3})*(?:\.\d+)?")


def read(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as handle:
        return handle.read()


def anchors(page):
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to -."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", read(page)), re.M)
    return {re.sub(r"[^\w\- ]", "", h.replace("`", "").strip().lower()).replace(" ", "-")
            for h in headings}


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_resolves(page):
    targets = [t for t in LINK.findall(FENCE.sub("", read(page))) if "://" not in t]
    assert targets, page
    for target in targets:
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) \
            if path else os.path.join(ROOT, page)
        assert os.path.exists(resolved), (page, target)
        if anchor:
            assert anchor in anchors(os.path.relpath(resolved, ROOT)), (page, target)


def test_every_docs_page_is_linked_from_the_front_pages():
    for front in FRONT_PAGES:
        linked = {os.path.normpath(t.partition("#")[0]) for t in LINK.findall(read(front))}
        assert {p for p in PAGES if p.startswith("docs/")} <= linked, front


@pytest.mark.parametrize("page", FRONT_PAGES)
def test_a_front_page_is_short_with_a_table_of_contents(page):
    text = read(page)
    assert len(text.splitlines()) <= 300
    contents = [t for t in LINK.findall(text) if t.startswith("#")]
    assert len(contents) >= 6 and all(t[1:] in anchors(page) for t in contents)


def quoted(page):
    """What a front page quotes: its code blocks, its code spans, and the numbers of its prose."""
    text = read(page)
    blocks = FENCE.findall(text)
    prose = FENCE.sub("", text)
    spans = SPAN.findall(prose)
    numbers = NUMBER.findall(re.sub(r"<[^>]+>|\([^)]*://[^)]*\)", "", SPAN.sub("", prose)))
    return blocks, set(spans), {n.replace("−", "-") for n in numbers}


def test_the_chinese_front_page_quotes_the_english_ones_commands_and_numbers():
    english, chinese = quoted("README.md"), quoted("README_cn.md")
    assert chinese[0] == english[0], "code blocks differ"
    assert chinese[1] == english[1], ("code spans differ", chinese[1] ^ english[1])
    assert chinese[2] == english[2], ("numbers differ", chinese[2] ^ english[2])


# Files of other repositories the pages cite (the original's, the R-Drop authors', Paddle's).
OTHER_FILES = {"train.py", "layer.py", "modeling.py", "flash_attention.py"}
# Keys of preflight's JSON report that read like code (``"attention": {"observed": ...}``).
REPORT_KEYS = {"attention.observed", "attention.planned"}
# What a file name ends with (``state.json``, ``run.lock``): a name, not a code reference.
EXTENSIONS = {"json", "jsonl", "lock", "npz", "txt", "yaml", "png", "safetensors", "pdparams",
              "pdmodel", "pdiparams", "log", "gz", "tar", "md", "ipynb", "partial", "old"}
# The project's folders: a path span starting with one of them names a file of the project.
FOLDERS = ("training", "models", "data", "losses", "utils", "bench", "configs", "docs", "tests")
PATH_SPAN = re.compile(r"^[\w.-]+(?:/[\w.-]+)*(?:\.(?:py|yaml|ipynb|md|txt|sh)|/)$")
CODE_SPAN = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?:\(\))?$")
FILE_NAME_SPAN = re.compile(r"^([\w/]+\.py):(\w+)$")


def _project_files():
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [path for path in listed if os.path.isfile(os.path.join(ROOT, path))]


def _defined(path):
    """``{name: set of member names}``: what ``path`` defines at its top level (functions,
    classes, assignments, imports) and, for a class, what its body defines."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    names = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            members = {n.name for n in node.body if isinstance(n, (ast.FunctionDef,
                                                                   ast.ClassDef))}
            members |= {t.id for n in node.body if isinstance(n, ast.AnnAssign | ast.Assign)
                        for t in ([n.target] if isinstance(n, ast.AnnAssign) else n.targets)
                        if isinstance(t, ast.Name)}
            members |= {a.attr for n in ast.walk(node) if isinstance(n, ast.Assign)
                        for a in n.targets if isinstance(a, ast.Attribute)}
            names[node.name] = members
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = set()
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in [node.target] if isinstance(node, ast.AnnAssign) else node.targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        names[name.id] = set()
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update({(a.asname or a.name).split(".")[0]: set() for a in node.names})
    return names


def _resolves(parts, modules):
    """Whether ``parts`` (a dotted reference) names something a module defines: a module
    path and a name in it, or a module's short name (``engine``) and a function, class or
    method in it; a class's member after it."""
    for cut in range(len(parts), 0, -1):
        candidates = modules.get(".".join(parts[:cut]), [])
        for path in candidates:
            rest, defined = parts[cut:], _defined(path)
            if not rest:
                return True
            if rest[0] in defined:
                return len(rest) == 1 or rest[1] in defined[rest[0]] or not defined[rest[0]]
            if "." not in ".".join(parts[:cut]) and any(rest[0] in members
                                                        for members in defined.values()):
                return True  # run.log_step: a method of the module's class, on an object
        if candidates:
            return False
    return False


def _config_keys():
    from training.config import CONFIG
    from utils.schema import Field, ListOf, Section, Tagged

    keys = set()

    def walk(node, path):
        keys.add(path)
        if isinstance(node, Section):
            for key, child in node.fields.items():
                walk(child, f"{path}.{key}")
        elif isinstance(node, Tagged):
            keys.add(f"{path}.name")
            for variant in node.variants.values():
                walk(variant, path)
        elif isinstance(node, ListOf):
            walk(node.item, f"{path}.N")
            for index in range(8):
                walk(node.item, f"{path}.{index}")
        elif isinstance(node, Field) and dict in node.types:
            keys.add(path + ".*")

    for key, child in CONFIG.fields.items():
        walk(child, key)
    return keys


def test_every_code_reference_of_the_pages_names_what_the_code_has():
    """A file path, ``file.py:name`` or a dotted name of the project in a code span of a page
    (not a config key, not Paddle's) resolves to a file and a definition in it."""
    files = _project_files()
    modules = {}
    for path in (p for p in files if p.endswith(".py")):
        dotted = path[:-3].replace("/", ".").removesuffix(".__init__")
        for name in {dotted, dotted.rsplit(".", 1)[-1]}:
            modules.setdefault(name, []).append(path)
    basenames = {os.path.basename(p) for p in files}
    folders = {os.path.dirname(p) for p in files}
    keys = _config_keys()
    unresolved = []
    for page in PAGES:
        for span in set(SPAN.findall(FENCE.sub("", read(page)))):
            span = span.strip()
            match = FILE_NAME_SPAN.match(span)
            if match:
                path, name = match.groups()
                if not (os.path.isfile(os.path.join(ROOT, path))
                        and _resolves([*path[:-3].split("/"), name], modules)):
                    unresolved.append((page, span))
            elif PATH_SPAN.match(span):  # a project path; outputs and other repos' aside
                name = span.rstrip("/")
                ours = name.split("/")[0] in FOLDERS if "/" in name else name.endswith(".py")
                if ours and not (os.path.exists(os.path.join(ROOT, name)) or name in basenames
                                 or name in folders or name in OTHER_FILES):
                    unresolved.append((page, span))
            elif CODE_SPAN.match(span):
                parts = CODE_SPAN.match(span).group(1).split(".")
                generic = ".".join(parts[:1] + ["*"] * (len(parts) > 1))
                if span in keys or generic in keys or span in REPORT_KEYS \
                        or parts[0] not in modules or parts[-1] in EXTENSIONS:
                    continue  # a config key, or not the project's (paddle.load)
                if not _resolves(parts, modules):
                    unresolved.append((page, span))
    assert unresolved == [], unresolved
