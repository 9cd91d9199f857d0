"""Load a YAML config, apply ``-o section.key=value`` overrides and validate it.

Every unknown key, missing key or wrong type is a :class:`UserError` that names
the key, so that a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any, Sequence

import yaml

from utils.errors import UserError
from utils.io.files import shown
from utils.schema import KWARG_BOUNDS, REQUIRED, Config, Field, ListOf, Section, Tagged
from utils.yaml_text import MAX_CONFIG_DEPTH, load_yaml, read_yaml, short

DEFAULT_CONFIG = "configs/rdrop_deit_b_384_cifar100.yaml"
# PPIM constructor arguments no setting may pass: what they would make the constructor do.
LOADER_KWARGS = {"pretrained": "download weights and load them with paddle.load (plain pickle)",
                 "return_transforms": "return a pair instead of the model"}


def path_override(key: str, path: Any) -> str:
    """The ``-o`` assignment that sets ``key`` to the string ``path`` as it is: a path is not
    YAML (``run #2`` would lose `` #2`` as a comment, ``true`` would be a boolean)."""
    return f"{key}={json.dumps(str(path))}"


# Values the documentation writes for the reader to fill in.
PLACEHOLDERS = ("...", "PATH", "/path/to/...", "<path>")


def parse_value(text: str) -> Any:
    """Parse one override value as YAML (``1e-4`` → float, ``[1, 2]`` → list); the
    documentation's placeholders (``...``, ``PATH``) are named as such."""
    if text.strip() in PLACEHOLDERS:
        raise UserError(f"override value {short(text)} is the documentation's placeholder; put "
                        f"the real value there (a path, a number)")
    if text != shown(text):  # bytes that are not UTF-8 (a GBK or Latin-1 file name): a path
        return text
    return load_yaml(text, f"override value {short(text)}")


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``a.b.0.c=value`` assignment to the raw (unvalidated) mapping."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise UserError(f"override {short(assignment)} must look like section.key=value")
    parts = key.split(".")
    if len(parts) > MAX_CONFIG_DEPTH:
        raise UserError(f"override key {short(key)} has {len(parts)} levels; configs have at "
                        f"most {MAX_CONFIG_DEPTH}")
    node = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[:depth]) or "the config"
        if isinstance(node, list):
            if not (part.isascii() and part.isdigit()) or int(part) >= len(node):
                raise UserError(
                    f"override {short(key)}: {where} is a list of {len(node)}, "
                    f"{short(part)} is not an index in it")
            part = int(part)
        elif not isinstance(node, dict):
            raise UserError(f"override {short(key)}: {where} is a value, not a section")
        if last:
            node[part] = parse_value(text)
        else:
            if isinstance(node, dict) and part not in node:
                node[part] = {}
            node = node[part]


def _type_name(types):
    return " or ".join(t.__name__ for t in types)


def _check_field(value, field, path):
    if value is None:
        if field.nullable:
            return None
        raise UserError(f"config key '{path}' must be {_type_name(field.types)}, got null")
    if float in field.types and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and bool not in field.types:
        raise UserError(f"config key '{path}' must be {_type_name(field.types)}, got bool {value}")
    if not isinstance(value, field.types):
        raise UserError(
            f"config key '{path}' must be {_type_name(field.types)}, "
            f"got {type(value).__name__} {short(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"config key '{path}' must be a finite number, got {value}")
    if isinstance(value, str) and "\x00" in value:
        raise UserError(f"config key '{path}' holds a NUL character, which no name or path "
                        f"can: {short(value)}")
    if field.choices and value not in field.choices:
        raise UserError(f"config key '{path}' must be one of {', '.join(field.choices)}; "
                        f"got {short(value)}")
    if field.item_type is not None:  # bounds apply to each item
        item = Field(field.item_type, minimum=field.minimum, maximum=field.maximum)
        value = [_check_field(v, item, f"{path}.{i}") for i, v in enumerate(value)]
        if field.length is not None and len(value) != field.length:
            raise UserError(f"config key '{path}' must have {field.length} items, got {len(value)}")
        return value
    if field.minimum is not None and value < field.minimum:
        raise UserError(f"config key '{path}' must be >= {field.minimum}, got {value!r}")
    if field.maximum is not None and value > field.maximum:
        raise UserError(f"config key '{path}' must be <= {field.maximum}, got {value!r}")
    return copy.deepcopy(value)


def _check_section(value, section, path, tag_keys=()):
    where = path or "the top level"
    if not isinstance(value, dict):
        raise UserError(f"config key '{path}' must be a section (mapping), got {type(value).__name__}")
    unknown = sorted(set(value) - set(section.fields), key=str)
    if unknown:
        valid = ", ".join([*tag_keys, *section.fields])
        raise UserError(
            f"config key {short(_join(path, unknown[0]))} is unknown; valid keys at {where}: "
            f"{valid}")
    result = section.view()
    for key, schema in section.fields.items():
        key_path = _join(path, key)
        if key in value:
            result[key] = validate(value[key], schema, key_path)
        elif section.partial:
            continue
        elif isinstance(schema, Field) and schema.default is not REQUIRED:
            result[key] = copy.deepcopy(schema.default)
        elif isinstance(schema, Section):
            result[key] = None if schema.optional else validate({}, schema, key_path)
        elif isinstance(schema, Tagged) and schema.default_name is not REQUIRED:
            result[key] = validate({"name": schema.default_name}, schema, key_path)
        else:
            raise UserError(f"config key '{key_path}' is missing")
    return result


def _join(path, key):
    return f"{path}.{key}" if path else str(key)


def validate(value: Any, schema: Any, path: str = "") -> Any:
    """Check ``value`` against ``schema``; return it with defaults filled in."""
    if isinstance(schema, Field):
        return _check_field(value, schema, path)
    if isinstance(schema, Section):
        return None if value is None and schema.optional else _check_section(value, schema, path)
    if isinstance(schema, Tagged):
        names = ", ".join(schema.variants)
        if not isinstance(value, dict) or "name" not in value:
            raise UserError(f"config key '{path}.name' is missing; one of {names}")
        name = value["name"]
        if name not in schema.variants:
            raise UserError(f"config key '{path}.name' must be one of {names}; got {name!r}")
        body = {k: v for k, v in value.items() if k != "name"}
        result = _check_section(body, schema.variants[name], path, tag_keys=("name",))
        return type(result)(name=name, **result)
    if isinstance(schema, ListOf):
        if not isinstance(value, list) or not value:
            raise UserError(f"config key '{path}' must be a non-empty list")
        return [validate(item, schema.item, f"{path}.{i}") for i, item in enumerate(value)]
    raise TypeError(f"unknown schema node {schema!r}")


def read_config(path: str, overrides: Sequence[str], schema: Section) -> Config:
    """Read ``path``, apply ``overrides`` (``section.key=value`` strings) and validate against
    ``schema`` (the whole config's: :func:`training.config.load_config`). ``path`` may be a
    run's output folder: its ``config.yaml``, with the folder as ``train.output_dir``
    (wherever it has moved since)."""
    if os.path.isdir(path):
        saved = os.path.join(path, "config.yaml")
        if not os.path.isfile(saved):
            run = os.path.dirname(os.path.normpath(os.path.abspath(path)))
            if os.path.isfile(os.path.join(run, "config.yaml")):  # its last/, vdl/, inference/
                raise UserError(f"-c {path} is a folder inside the run folder {run}; pass "
                                f"-c {run}")
            raise UserError(f"-c {path} is a folder without config.yaml: not the output folder "
                            f"of a run; pass a config file or a run's folder")
        overrides = [path_override("train.output_dir", os.path.abspath(path)), *overrides]
        path = saved
    raw = read_yaml(path)
    for assignment in overrides:
        apply_override(raw, assignment)
    cfg = validate(raw, schema)
    check_relations(cfg)
    return cfg


def _check_kwargs(kwargs, where="model.kwargs"):
    """``model.kwargs`` (or ``where``): names to plain values; PPIM's sizing arguments within
    bounds."""
    for key, value in kwargs.items():
        path = f"{where}.{key}"
        if not isinstance(key, str):
            raise UserError(f"config key '{where}' must map argument names to values, got the "
                            f"key {short(key)}")
        if key in LOADER_KWARGS:
            raise UserError(f"config key '{path}' is not accepted: it makes PPIM's constructor "
                            f"{LOADER_KWARGS[key]}; weights are loaded by model.pretrained "
                            f"(distill.weights for a teacher), through this project's checked "
                            f"loader")
        items = value if isinstance(value, list) else [value]
        if len(items) > 16 or not all(isinstance(v, (type(None), bool, int, float, str))
                                      for v in items):
            raise UserError(f"config key '{path}' must be a number, a string, a boolean or a "
                            f"short list of them; got {short(value)}")
        for item in items:
            if isinstance(item, float) and not math.isfinite(item):
                raise UserError(f"config key '{path}' must be a finite number, got {item}")
        if key in KWARG_BOUNDS:
            kind, low, high = KWARG_BOUNDS[key]
            field = Field(kind, minimum=low, maximum=high, nullable=key == "qk_scale")
            kwargs[key] = _check_field(value, field, path)
    dim, heads = kwargs.get("embed_dim"), kwargs.get("num_heads")
    if dim is not None and heads is not None and dim % heads:
        raise UserError(f"config keys '{where}.embed_dim'={dim} and '.num_heads'={heads}: "
                        f"the width must divide into the heads")


def check_relations(cfg: Config) -> None:
    """Checks that involve more than one key."""
    _check_kwargs(cfg.model.kwargs)
    stages = len(cfg.stages)
    if not -stages <= cfg.train.swa.stage < stages:
        raise UserError(f"config key 'train.swa.stage' must name one of the {stages} stages "
                        f"(0..{stages - 1}, or -1 for the last); got {cfg.train.swa.stage}")
    if cfg.train.lr_scaling == "linear" and cfg.train.reference_batch is None:
        raise UserError("config key 'train.reference_batch' is missing: train.lr_scaling=linear "
                        "scales the learning rates by data.batch_size / train.reference_batch")
    crop = cfg.data.random_resized_crop
    if crop and not (0 < crop.scale[0] <= crop.scale[1] and crop.ratio[0] <= crop.ratio[1]):
        raise UserError(f"config key 'data.random_resized_crop': scale must be [a, b] with "
                        f"0 < a <= b <= 1 and ratio [r1, r2] with r1 <= r2; got scale "
                        f"{crop.scale}, ratio {crop.ratio}")
    if cfg.model.head_init == "zero" and cfg.model.head != "linear":
        raise UserError("config key 'model.head_init': zero applies to the linear class heads; "
                        "with model.head=mlp leave it at default")
    if cfg.distill is not None:
        _check_kwargs(cfg.distill.kwargs, "distill.kwargs")
        if cfg.model.head != "linear":
            raise UserError("config key 'distill': the teacher trains the distillation head of "
                            "a DeiT distilled model; set model.head=linear")
    for index, stage in enumerate(cfg.stages):
        if stage.trainable is not None and not (stage.trainable and all(stage.trainable)):
            raise UserError(f"config key 'stages.{index}.trainable' must list parameter names "
                            f"(e.g. [head, head_dist, norm]), got {short(stage.trainable)}")
        if (stage.epochs is None) == (stage.steps is None):
            raise UserError(f"config key 'stages.{index}.epochs' is "
                            f"{'missing' if stage.epochs is None else 'given with .steps'}: "
                            f"give the stage's length in epochs or in optimizer steps (steps)")
        if stage.until.get("val_top5") is not None and cfg.model.num_classes <= 5:
            raise UserError(f"config key 'stages.{index}.until.val_top5': with "
                            f"{cfg.model.num_classes} classes every label is in the top five, "
                            f"so there is no top-5 accuracy to reach; use until.val_top1")
        if stage.warmup.steps and stage.warmup.epochs:
            raise UserError(f"config keys 'stages.{index}.warmup.steps' and '.epochs': "
                            f"give one of them, not both")


def to_plain(node: Any) -> Any:
    """Turn a validated config back into plain dicts and lists (for YAML/JSON)."""
    if isinstance(node, dict):
        return {key: to_plain(value) for key, value in node.items()}
    if isinstance(node, list):
        return [to_plain(item) for item in node]
    return node


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(to_plain(cfg), sort_keys=False, default_flow_style=None,
                          width=math.inf)  # a long path stays on one line, as a user copies it
