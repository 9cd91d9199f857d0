"""Config loading, overrides and validation errors that name the key."""

import pytest
from conftest import run_script

from utils.config import DEFAULT_CONFIG, apply_override, load_config, parse_value
from utils.errors import UserError


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
    ("stages.0.optimizer.name=SGD", "config key 'stages.0.optimizer.name' must be one of AdamW, Momentum"),
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


def test_missing_required_key_is_named():
    raw = {"stages": [{"optimizer": {"name": "AdamW", "lr": 1.0}}], "data": {"batch_size": 2},
           "model": {"num_classes": 3}}
    from utils.config import check_relations, validate
    from utils.schema import CONFIG

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


def test_cli_config_error_is_one_line_without_traceback():
    proc = run_script("main.py", "-o", "data.bach_size=3", "--dry-run")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: config key 'data.bach_size' is unknown; valid keys at data: name, path, "
        "train_list, test_list, val_list, label_names, val_split, train_subset, val_subset, "
        "image_size, batch_size, eval_batch_size, num_workers, hflip_prob, rotation, "
        "train_augment, random_resized_crop, crop_fraction, skip_bad_images"]


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


def test_help_describes_options():
    proc = run_script("main.py", "--help")
    assert proc.returncode == 0
    for option in ("--config", "--override", "--dry-run"):
        assert option in proc.stdout
