"""training/stage.py: one stage setup for training, the stage check and preflight, released
when the stage ends; and how far below main.py a training step runs."""

import json
import os

import pytest
from conftest import run_script

# The FixRes demo shortened: three stages (AdamW at 24 px, Momentum, a head-only AdamW at
# 32 px), each with its optimizer and loss.
FIXRES_SHORT = ["-c", "configs/demo_fixres.yaml", "-o", "data.train_subset=64", "-o",
                "data.val_subset=20", "-o", "stages.0.epochs=1", "-o", "stages.1.epochs=1",
                "-o", "stages.2.epochs=1"]


def _probe(tmp_path, name, *args, env=None):
    """What tests/stack_probe.py records while ``main.py ARGS`` runs."""
    out = str(tmp_path / f"{name}.json")
    proc = run_script(os.path.join("tests", "stack_probe.py"), out, *args, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out, encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def fixres_run(tmp_path_factory):
    """The probes of the short FixRes demo, trained with its stage check."""
    tmp = tmp_path_factory.mktemp("probe")
    return _probe(tmp, "run", *FIXRES_SHORT, "-o", f"train.output_dir={tmp / 'run'}")


def _training_steps(records):
    return [step for step in records["steps"]
            if not any(frame.startswith("training/stage_check.py") for frame in step["frames"])]


def test_a_training_step_is_six_calls_below_main_py_in_four_files_at_most(fixres_run):
    steps = _training_steps(fixres_run)
    assert len(steps) == 3  # one optimizer per stage
    for step in steps:
        frames = step["frames"]
        assert frames[0] == "main.py:<module>" and frames[-1] == "training/grads.py:apply_update"
        assert len(frames) <= 6 and len({frame.split(":")[0] for frame in frames}) <= 4, frames
        assert "training/engine.py:train_one_epoch" in frames


def test_every_optimizer_and_loss_of_a_run_and_its_check_is_built_by_build_stage(fixres_run):
    built = fixres_run["built"]
    # Three stages, each built by the check and by the run: an optimizer and a loss each.
    assert sorted(item["what"] for item in built) == ["AdamW"] * 4 + ["Momentum"] * 2 + \
        ["RDropLoss"] * 6
    assert all("training/stage.py:build_stage" in item["frames"] for item in built)
    checked = [item for item in built if "training/stage_check.py:check_stages" in item["frames"]]
    assert len(checked) == 6


def test_preflight_builds_its_stages_with_build_stage_too(tmp_path):
    records = _probe(tmp_path, "preflight", *FIXRES_SHORT, "--preflight", "--json")
    built = records["built"]
    assert len(built) >= 12  # the check's three stages and at least the three timed setups
    assert all("training/stage.py:build_stage" in item["frames"] for item in built)
    assert any("preflight.py:_time_steps" in item["frames"] for item in built)


def test_nothing_of_the_check_or_an_earlier_stage_is_alive_when_a_stage_trains(fixres_run):
    """Paddle's optimizers sit in a reference cycle: with Python's automatic collection
    off, only the run's own collections free them, at the end of the check and of each
    stage."""
    for step in _training_steps(fixres_run):
        assert step["other_optimizers_alive"] == 0
        assert step["scratch_models_alive"] == 0


def test_without_those_collections_the_probe_finds_the_optimizers_alive(tmp_path):
    """The probe itself: with ``gc.collect`` made a no-op the check's and the earlier
    stages' optimizers stay alive (so the test above can fail)."""
    site = tmp_path / "no_collect"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import gc\ngc.collect = lambda *args: 0\n")
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    records = _probe(tmp_path, "leaky", *FIXRES_SHORT, "-o", f"train.output_dir={tmp_path}/run",
                     env={"PYTHONPATH": path})
    alive = [step["other_optimizers_alive"] for step in _training_steps(records)]
    assert alive[0] >= 3 and alive[-1] > alive[0]
