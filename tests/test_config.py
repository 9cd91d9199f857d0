"""utils/config.py, utils/schema.py and utils/yaml_text.py: config loading, overrides and
validation errors that name the key, and what a careless or hostile config tries (non-finite
numbers, bounds, YAML bombs, repeated keys, paths parsed as YAML, PPIM's loader arguments)."""

import os
import time
import typing
from typing import Optional

import pytest
from conftest import DEMO_CLI, HANG_S, ROOT, assert_one_error, run_script

from models.inference import _checked_contract
from training.config import CONFIG, load_config
from training.optimizers.adamw import AdamWConfig
from training.optimizers.momentum import MomentumConfig
from utils.config import DEFAULT_CONFIG, apply_override, parse_value, path_override
from utils.errors import UserError
from utils.io.files import path_problem
from utils.schema import (
    Config,
    CropConfig,
    DataConfig,
    EmaConfig,
    Field,
    ListOf,
    Node,
    Section,
    StageConfig,
    Tagged,
    TrainConfig,
)


def test_reproduction_config_expresses_the_original_path():
    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.model.name == "deit_b_distilled_384" and cfg.model.pretrained is True
    assert cfg.model.num_classes == 100 and cfg.model.drop_rate == 0.3
    assert cfg.loss.rdrop and cfg.loss.alpha == 5.0
    first, full, momentum, low = cfg.stages
    assert first.until == {"val_top1": 0.6} and full.until == {"val_top1": 0.85}
    assert first.optimizer.name == "AdamW" and first.optimizer.lr == 1e-4
    assert first.data == {"train_subset": 1000, "val_subset": 100}
    assert full.optimizer.name == "AdamW" and full.data == {}
    assert momentum.optimizer.name == "Momentum" and momentum.optimizer.lr == 1e-3
    assert momentum.optimizer.l2_decay == 1e-2 and momentum.lr_schedule.name == "polynomial"
    assert low.optimizer.lr == 3e-4 and low.data["hflip_prob"] > cfg.data.hflip_prob


def test_overrides_parse_yaml_values_and_list_indices():
    cfg = load_config("configs/demo.yaml", ["stages.0.optimizer.lr=1e-4", "data.batch_size=8",
                                            "loss.rdrop=false", "model.kwargs.depth=1"])
    assert cfg.stages[0].optimizer.lr == pytest.approx(1e-4)
    assert isinstance(cfg.stages[0].optimizer.lr, float)
    assert cfg.data.batch_size == 8 and cfg.loss.rdrop is False
    assert cfg.model.kwargs["depth"] == 1


def test_defaults_are_filled_and_ints_accepted_for_floats():
    cfg = load_config("configs/demo.yaml", ["loss.alpha=2", "stages.1.lr_schedule={name: polynomial}"])
    assert cfg.loss.alpha == 2.0 and isinstance(cfg.loss.alpha, float)
    assert cfg.stages[1].lr_schedule == {"name": "polynomial", "end_lr": 0.0, "power": 1.0}
    assert cfg.stages[0].lr_schedule == {"name": "constant"}


@pytest.mark.parametrize("override, message", [
    ("data.bach_size=3", "config key 'data.bach_size' is unknown; valid keys at data: name, path"),
    ("loss.alpha=abc", "config key 'loss.alpha' must be float, got str 'abc'"),
    ("data.batch_size=2.5", "config key 'data.batch_size' must be int, got float 2.5"),
    ("loss.rdrop=1", "config key 'loss.rdrop' must be bool, got int 1"),
    ("data.batch_size=true", "config key 'data.batch_size' must be int, got bool True"),
    ("stages.0.optimizer.momentum=0.9",
     "config key 'stages.0.optimizer.momentum' is unknown; valid keys at stages.0.optimizer: name, lr"),
    ("stages.0.optimizer.name=Adagrad",
     "config key 'stages.0.optimizer.name' must be one of AdamW, Momentum, SGD"),
    ("stages.0.optimizer.betas=[0.9]", "config key 'stages.0.optimizer.betas' must have 2 items"),
    ("loss.kl_reduction=mean", "config key 'loss.kl_reduction' must be one of batchmean, sum"),
    ("data.hflip_prob=1.5", "config key 'data.hflip_prob' must be <= 1.0"),
    ("stages.0.epochs=0", "config key 'stages.0.epochs' must be >= 1"),
    ("stages.9.epochs=1", "override 'stages.9.epochs': stages is a list of 2"),
    ("stages=[]", "config key 'stages' must be a non-empty list"),
    ("data.batch_size", "must look like section.key=value"),
    ("data.random_resized_crop={scale: [0.5, 0.1]}", "scale must be [a, b] with 0 < a <= b <= 1"),
    ("data.random_resized_crop={scale: [0.0, 1.0]}", "scale must be [a, b] with 0 < a <= b <= 1"),
    ("data.random_resized_crop={ratio: [2.0, 0.5]}", "ratio [r1, r2] with r1 <= r2"),
    ("data.random_resized_crop={scale: [.nan, 1.0]}",
     "'data.random_resized_crop.scale.0' must be a finite number"),
    ("data.random_resized_crop={scale: [0.1, 0.5, 1.0]}",
     "'data.random_resized_crop.scale' must have 2 items"),
    ("data.random_resized_crop=[0.1, 1.0]", "'data.random_resized_crop' must be a section"),
    ("loss.form=papers", "config key 'loss.form' must be one of mean, paper"),
    ("stages.1.steps=0", "config key 'stages.1.steps' must be >= 1"),
    ("stages.1.steps=100", "'stages.1.epochs' is given with .steps"),
    ("train.eval_every_steps=0", "config key 'train.eval_every_steps' must be >= 1"),
])
def test_bad_keys_and_types_name_the_key(override, message):
    with pytest.raises(UserError) as info:
        load_config("configs/demo.yaml", [override])
    assert message in str(info.value)


def test_zero_heads_need_the_linear_heads():
    with pytest.raises(UserError, match="'model.head_init': zero applies to the linear"):
        load_config("configs/demo.yaml", ["model.head=mlp", "model.head_init=zero"])


def test_a_top5_goal_among_five_classes_or_fewer_is_refused():
    """Every label is in the top five there: no top-5 is measured, so no goal can be met."""
    with pytest.raises(UserError, match="'stages.0.until.val_top5': with 5 classes every label "
                                        "is in the top five"):
        load_config("configs/demo.yaml", ["model.num_classes=5", "stages.0.until.val_top5=0.9"])
    assert load_config("configs/demo.yaml", ["stages.0.until.val_top5=0.9"]).stages[0].until \
        == {"val_top5": 0.9}  # ten classes


def test_missing_required_key_is_named():
    raw = {"stages": [{"optimizer": {"name": "AdamW", "lr": 1.0}}], "data": {"batch_size": 2},
           "model": {"num_classes": 3}}
    from utils.config import check_relations, validate

    with pytest.raises(UserError, match="config key 'stages.0.epochs' is missing"):
        check_relations(validate(raw, CONFIG))
    raw["stages"][0].update(epochs=2, steps=10)
    with pytest.raises(UserError, match="'stages.0.epochs' is given with .steps"):
        check_relations(validate(raw, CONFIG))


def test_scientific_notation_without_dot_is_a_float():
    assert parse_value("1e-4") == pytest.approx(1e-4) and isinstance(parse_value("3E5"), float)
    assert parse_value("12") == 12 and parse_value("abc") == "abc"


def test_override_creates_missing_sections():
    raw = {"model": {}}
    apply_override(raw, "model.kwargs.depth=2")
    assert raw == {"model": {"kwargs": {"depth": 2}}}


@pytest.mark.slow
def test_cli_config_error_is_one_line_without_traceback():
    proc = run_script("main.py", "-o", "data.bach_size=3", "--dry-run")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: config key 'data.bach_size' is unknown; valid keys at data: name, path, "
        "train_list, test_list, val_list, label_names, val_split, train_subset, val_subset, "
        "image_size, batch_size, eval_batch_size, num_workers, hflip_prob, rotation, "
        "train_augment, random_resized_crop, crop_fraction, skip_bad_images"]


@pytest.mark.slow
def test_dry_run_prints_config_and_stage_plan():
    proc = run_script("main.py", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    plan = proc.stdout.split("stage plan:")[1].split("\ncost:")[0].strip().splitlines()
    assert len(plan) == 4
    assert "cost: at most 13535 optimizer steps, 324840 images" in proc.stdout
    assert "train 1000 / val 100 images" in plan[0] and "AdamW lr=0.0001" in plan[0]
    assert "until val_top1 >= 0.6" in plan[0] and "20 steps of linear warmup" in plan[0]
    assert "Momentum lr=0.001" in plan[2] and "l2_decay=0.01" in plan[2]
    assert "polynomial decay" in plan[2]
    assert "Momentum lr=0.0003" in plan[3] and "hflip p=0.8" in plan[3]
    assert "name: deit_b_distilled_384" in proc.stdout
    run_line = proc.stdout.split("training: ")[1].splitlines()[0]
    assert "clip global norm 1" in run_line and "EMA decay 0.9998" in run_line
    assert "SWA from stage 3 epoch 1" in run_line


@pytest.mark.slow
def test_help_describes_options():
    proc = run_script("main.py", "--help")
    assert proc.returncode == 0
    for option in ("--config", "--override", "--dry-run"):
        assert option in proc.stdout


FLOAT_KEYS = ["loss.alpha", "train.ema.decay", "stages.0.optimizer.lr", "stages.0.warmup.epochs",
              "train.clip_grad_norm", "data.rotation", "model.drop_rate",
              "stages.1.lr_schedule.end_lr", "model.kwargs.mlp_ratio", "stages.0.until.val_top1",
              "stages.0.loss.alpha", "stages.0.optimizer.epsilon", "stages.1.optimizer.l2_decay"]


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", ".NaN", "-.Inf"])
def test_non_finite_numbers_are_refused_for_every_float_key(value):
    from training.config import load_config
    from utils.errors import UserError

    for key in FLOAT_KEYS:
        with pytest.raises(UserError, match=f"'{key}' must be a finite number"):
            load_config("configs/demo.yaml", [f"{key}={value}"])
    with pytest.raises(UserError, match="'stages.0.optimizer.betas.1' must be a finite number"):
        load_config("configs/demo.yaml", [f"stages.0.optimizer.betas=[0.9, {value}]"])


@pytest.mark.slow
@pytest.mark.parametrize("override,message", [
    ("train.seed=-1", "'train.seed' must be >= 0"),
    ("train.seed=1099511627776", "'train.seed' must be <= 4294967295"),
    ("data.batch_size=1000000000000", "'data.batch_size' must be <= 65536"),
    ("data.image_size=100000", "'data.image_size' must be <= 1024"),
    ("model.kwargs.depth=1000000", "'model.kwargs.depth' must be <= 128"),
    ("model.kwargs.embed_dim=-5", "'model.kwargs.embed_dim' must be >= 1"),
    ("model.kwargs.num_heads=3", "the width must divide into the heads"),
    ("model.kwargs.depth=2.5", "'model.kwargs.depth' must be int"),
    ("model.kwargs={depth: {nested: 1}}", "must be a number, a string, a boolean"),
    ("stages.0.epochs=10000000000", "'stages.0.epochs' must be <= 1000000000"),
    ("data.num_workers=100000", "'data.num_workers' must be <= 64"),
])
def test_integer_and_model_size_bounds(override, message):
    assert_one_error(run_script("main.py", *DEMO_CLI, "-o", override, "--dry-run"), message)


@pytest.mark.slow
def test_a_config_that_is_not_utf8_or_a_yaml_bomb_is_one_line(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("data:\n  name: d\xefgits\n".encode("latin-1"))
    assert_one_error(run_script("main.py", "-c", str(latin), "--dry-run"), "is not UTF-8 text")
    lines = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for level, name in enumerate("bcdefghi"):
        previous = "abcdefghi"[level]
        lines.append(f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]")
    bomb = tmp_path / "laughs.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    start = time.time()
    assert_one_error(run_script("main.py", "-c", str(bomb), "--dry-run", timeout=HANG_S),
                     "expands to more than 100000 values")
    assert_one_error(run_script("main.py", *DEMO_CLI, "-o",
                                "model.kwargs={a: &a [1, 1], b: [*a, *a]}", "--dry-run"),
                     "'model.kwargs.b' must be a number, a string")
    assert time.time() - start < 60


def test_a_crop_fraction_that_would_blow_up_the_resize_is_refused():
    with pytest.raises(UserError, match="'data.crop_fraction' must be >= 0.25"):
        load_config("configs/demo.yaml", ["data.crop_fraction=0.01"])
    contract = {"image_size": 1024, "crop_fraction": 0.01, "class_names": ["a", "b"]}
    with pytest.raises(UserError, match=r"crop_fraction in \[0.25, 1\]"):
        _checked_contract(contract, "preprocess.json")


def test_a_repeated_yaml_key_is_an_error_not_a_silent_replacement(tmp_path):
    text = open(os.path.join(ROOT, "configs", "demo.yaml"), encoding="utf-8").read()
    config = tmp_path / "twice.yaml"
    config.write_text(text + "\ntrain:\n  seed: 3\n")
    with pytest.raises(UserError, match="the key 'train' appears twice"):
        load_config(str(config))
    config.write_text(text.replace("  seed: 0", "  seed: 0\n  seed: 1"))
    with pytest.raises(UserError, match="the key 'seed' appears twice"):
        load_config(str(config))


@pytest.mark.slow
def test_paths_given_as_arguments_are_not_parsed_as_yaml(tmp_path):
    for path in ("run #2", "true", "1e3", "[a]", "a: b", "~"):
        cfg = load_config("configs/demo.yaml", [path_override("train.output_dir", path)])
        assert cfg.train.output_dir == path
    proc = run_script("main.py", "-c", "configs/demo.yaml", "--init-from",
                      str(tmp_path / "run #2" / "w.safetensors"), "--dry-run")
    assert proc.returncode == 0 and "run #2/w.safetensors" in proc.stdout, proc.stderr[-800:]


@pytest.mark.slow
def test_a_deep_override_and_a_nul_character_are_one_line(tmp_path):
    with pytest.raises(UserError, match="has 200 levels; configs have at most 32"):
        load_config("configs/demo.yaml", [".".join(["a"] * 200) + "=1"])
    with pytest.raises(UserError, match="'train.output_dir' holds a NUL character"):
        load_config("configs/demo.yaml", ['train.output_dir="out\\0put"'])
    assert path_problem("a\0b") == "holds a NUL character, which no file name can"
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    proc = run_script("main.py", "-c", "configs/demo.yaml", "-o", f"train.output_dir={loop}/x")
    assert_one_error(proc)


@pytest.mark.slow
def test_values_nested_thousands_of_levels_are_one_line_in_a_file_and_an_override(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("train:\n  seed: " + "[" * 5000 + "]" * 5000 + "\n")
    proc = run_script("main.py", "-c", str(deep), "--dry-run")
    assert_one_error(proc, f"config file {deep} nests more than 32 levels deep")
    proc = run_script("main.py", "-c", "configs/demo.yaml", "-o",
                      "model.kwargs=" + "{a: " * 3000 + "1" + "}" * 3000, "--dry-run")
    assert_one_error(proc, "nests more than 32 levels deep")


def test_an_override_changes_only_the_key_it_names_under_a_yaml_anchor(tmp_path):
    """Two stages sharing an optimizer block through an anchor (&opt / *opt): setting stage
    1's learning rate leaves stage 0's as written."""
    text = open(os.path.join(ROOT, "configs", "demo.yaml"), encoding="utf-8").read()
    shared = tmp_path / "anchored.yaml"
    shared.write_text(text.split("stages:", 1)[0] + "stages:\n"
                      "  - epochs: 2\n    optimizer: &opt {name: AdamW, lr: 0.001}\n"
                      "  - epochs: 2\n    optimizer: *opt\n")
    cfg = load_config(str(shared), ["stages.1.optimizer.lr=0.5"])
    assert [stage.optimizer.lr for stage in cfg.stages] == [0.001, 0.5]


@pytest.mark.parametrize("key", ["model.kwargs", "distill.kwargs"])
@pytest.mark.parametrize("name", ["pretrained", "return_transforms"])
def test_no_setting_passes_ppims_loading_arguments(key, name):
    overrides = [f"{key}={{{name}: true}}"]
    if key == "distill.kwargs":
        overrides.append("distill.teacher=deit_s_distilled")
    with pytest.raises(UserError, match=f"'{key}.{name}' is not accepted: it makes PPIM's"):
        load_config("configs/demo.yaml", overrides)


CONFIG_ROWS = [
    ("loss.alpha=-1", "'loss.alpha' must be >= 0.0"),
    ("data.hflip_prob=1.5", "'data.hflip_prob' must be <= 1.0"),
    ("data.batch_size=0", "'data.batch_size' must be >= 1"),
    ("stages.0.optimizer.name=Adagrad", "'stages.0.optimizer.name' must be one of AdamW, Momentum, SGD"),
    ("stages.1.optimizer.momentum=1.5", "'stages.1.optimizer.momentum' must be <= 1.0"),
    ("stages.0.optimizer.betas=[0.9, 2]", "'stages.0.optimizer.betas.1' must be <= 1.0"),
    ("stages.0.until.val_top1=93", "'stages.0.until.val_top1' must be <= 1.0"),
    ("model.drop_rate=high", "'model.drop_rate' must be float, got str"),
    ("train.nan_policy=ignore", "'train.nan_policy' must be one of stop, skip"),
    ("train.sede=1", "'train.sede' is unknown; valid keys at train: output_dir, seed"),
]


@pytest.mark.slow
@pytest.mark.parametrize("override,message", CONFIG_ROWS)
def test_bad_config_value_names_the_key(override, message):
    assert_one_error(run_script("main.py", *DEMO_CLI, "-o", override, "--dry-run"), message)


def _sections(schema, path="config"):
    """``(path, Section)`` of every section in ``schema``, Tagged variants included."""
    if isinstance(schema, Section):
        yield path, schema
        for key, field in schema.fields.items():
            yield from _sections(field, f"{path}.{key}")
    elif isinstance(schema, Tagged):
        for name, variant in schema.variants.items():
            yield from _sections(variant, f"{path}[{name}]")
    elif isinstance(schema, ListOf):
        yield from _sections(schema.item, f"{path}.N")


def _accepts(hint, field):
    """Whether the type hint ``hint`` names the field's types (and None when it is
    nullable or optional)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    allowed = set(args) if origin is typing.Union else {hint}
    allowed = {typing.get_origin(a) or a for a in allowed}
    if isinstance(field, Section):
        want = {field.view} | ({type(None)} if field.optional else set())
    else:
        want = set(field.types) | ({type(None)} if field.nullable or field.default is None
                                   else set())
    return allowed == want


def _keys(view):
    return {key: hint for key, hint in typing.get_type_hints(view).items()
            if not key.startswith("_")}


def test_every_section_is_read_from_the_keys_its_view_declares_with_their_types():
    for path, section in _sections(CONFIG):
        hints = _keys(section.view)
        assert section.view is not Node, path
        assert set(section.fields) <= set(hints), (path, set(section.fields) - set(hints))
        for key, field in section.fields.items():
            if isinstance(field, (Field, Section)):
                assert _accepts(hints[key], field), (path, key, hints[key], field)
    extra = {path: set(_keys(s.view)) - set(s.fields) for path, s in _sections(CONFIG)}
    # Only a tagged section's name, which selects the variant.
    assert {path: keys for path, keys in extra.items() if keys} == {
        f"config.stages.N.{kind}[{name}]": {"name"}
        for kind, names in (("optimizer", ("AdamW", "Momentum", "SGD")),
                            ("lr_schedule", ("constant", "polynomial", "cosine")))
        for name in names}


def test_a_key_is_declared_once_on_its_view():
    """The schema is read from the views: a default, a bound or a choice given on a view
    is the validator's, and the view's class keeps no declaration in place of a value."""
    from training.optimizers.adamw import AdamWConfig as View
    from utils.schema import DataConfig, Section, key

    class Probe(Node):
        size: int = key(3, minimum=1)
        names: Optional[list[str]] = key(None)

    section = Section.of(Probe)
    assert section.fields["size"].types == (int,) and section.fields["size"].minimum == 1
    assert section.fields["names"].nullable and section.fields["names"].item_type is str
    assert not hasattr(Probe, "size") and "lr" in View._declared
    assert CONFIG.fields["data"].fields["batch_size"].maximum == \
        DataConfig._declared["batch_size"].maximum


def test_a_loaded_config_is_made_of_the_typed_views():
    cfg = load_config("configs/demo_fixres.yaml", ["stages.1.lr_schedule.end_lr=0.001"])
    assert type(cfg) is Config and isinstance(cfg.train, TrainConfig)
    assert isinstance(cfg.data, DataConfig) and isinstance(cfg.data.random_resized_crop,
                                                           CropConfig)
    assert isinstance(cfg.train.ema, EmaConfig) and isinstance(cfg.stages[0], StageConfig)
    assert [type(s.optimizer) for s in cfg.stages] == [AdamWConfig, MomentumConfig, AdamWConfig]
    assert list(cfg.stages[1].lr_schedule) == ["name", "end_lr", "power"]
    assert cfg.stages[1].lr_schedule.end_lr == 0.001 and cfg.distill is None


@pytest.mark.slow
@pytest.mark.parametrize("value, fragment", [
    ("...", "override value '...' is the documentation's placeholder"),
    ("/path/to/...", "is the documentation's placeholder"),
])
def test_a_placeholder_pasted_from_the_docs_is_named_as_one(value, fragment):
    proc = run_script("main.py", "-c", "configs/demo.yaml", "-o", f"data.path={value}",
                      "--dry-run")
    assert_one_error(proc, fragment)


def test_a_placeholder_path_is_named_as_one_where_a_file_is_read():
    from utils.io.files import path_problem

    assert path_problem("/path/to/cifar-100-python.tar.gz").startswith(
        "does not exist: /path/to/... is the documentation's placeholder")
