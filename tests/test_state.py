"""The typed run state: JSON round trips in the form state.json has on disk, and the
weights swapped in for an evaluation always swapped back."""

import json

import numpy as np
import paddle
import pytest

from training.averaging import weights_in
from training.state import EpochProgress, Position, RunState, check_json
from utils.checkpoint import check_files


def _busy_state():
    progress = EpochProgress(micro=6, seen=192, sums={"loss": 12.5, "ce": 10.0, "kl": 2.5},
                             elapsed=3.25, excluded=32, steps=3, overflow_steps=1,
                             grad_norm_sum=4.5, grad_norm_max=2.0)
    return RunState(config={"train": {"seed": 0}}, position=Position(1, 2, 6, evaluating=True),
                    epoch_index=7, global_step=41, skipped_steps=2,
                    best={"stage": 0, "epoch": 3, "kind": "ema", "val_top1": 0.5,
                          "val_num_samples": 40},
                    progress=progress, updates={"ema": 41, "swa": 2}, tested=True)


def test_the_run_state_survives_json_unchanged_and_passes_the_checkpoint_check():
    state = _busy_state()
    text = json.dumps(state.to_json())
    again = RunState.from_json(json.loads(text))
    assert again == state and again.progress.sums == {"loss": 12.5, "ce": 10.0, "kl": 2.5}
    written = dict(json.loads(text), files=["raw", "optimizer", "ema", "swa"])
    check_files(written)
    check_json(RunState, written)
    fresh = RunState(config={})
    assert RunState.from_json(fresh.to_json()) == fresh
    assert fresh.to_json()["position"] == {"stage": 0, "epoch": 0, "micro": 0}


def test_a_position_keeps_the_on_disk_form_of_earlier_checkpoints():
    assert Position(1, 0, 0).to_json() == {"stage": 1, "epoch": 0, "micro": 0}
    assert Position(1, 0, 8, True).to_json() == {"stage": 1, "epoch": 0, "micro": 8,
                                                 "evaluating": True}
    assert Position.from_json({"stage": 2, "epoch": 1, "micro": 4}) == Position(2, 1, 4)
    # Keys a later version may add are ignored, not a crash.
    assert Position.from_json({"stage": 2, "epoch": 1, "micro": 4, "note": "x"}) == \
        Position(2, 1, 4)
    progress = EpochProgress.from_json(dict(EpochProgress(micro=3).to_json(), note="x"))
    assert progress == EpochProgress(micro=3)


def test_a_resumed_epoch_never_shares_the_saved_sums():
    saved = _busy_state().progress
    resumed = saved.resumed()  # one process: rank 0 carries every sum
    resumed.sums["loss"] += 1.0
    assert saved.sums["loss"] == 12.5 and resumed.micro == 6 and resumed.seen == 192
    assert saved.summed() == saved  # one process: nothing to add
    means = saved.means()
    assert means["loss"] == pytest.approx(12.5 / 160) and means["grad_norm"] == 1.5


def test_weights_swapped_in_come_back_even_when_the_block_fails():
    paddle.seed(0)
    layer = paddle.nn.Linear(3, 2)
    own = {k: v.numpy().copy() for k, v in layer.state_dict().items()}
    other = {k: np.full_like(v, 7.0) for k, v in own.items()}
    with pytest.raises(RuntimeError):
        with weights_in(layer, other):
            assert np.all(layer.weight.numpy() == 7.0)
            raise RuntimeError("evaluation failed")
    assert all(np.array_equal(layer.state_dict()[k].numpy(), v) for k, v in own.items())


def test_a_checkpoint_from_before_a_key_existed_resumes_with_its_default():
    from training.config import load_config
    from training.state import check_same_config
    from utils.config import to_plain
    from utils.errors import UserError

    cfg = load_config("configs/demo.yaml")
    older = to_plain(cfg)
    del older["loss"]["form"], older["model"]["head_init"], older["data"]["random_resized_crop"]
    check_same_config(RunState(config=older), cfg, "last")  # the defaults: the same run
    older["loss"]["alpha"] = 2.5
    with pytest.raises(UserError, match="'loss.alpha' differs"):
        check_same_config(RunState(config=older), cfg, "last")
    with pytest.raises(UserError, match="'loss.form' differs"):
        check_same_config(RunState(config=to_plain(cfg)),
                          load_config("configs/demo.yaml", ["loss.form=paper"]), "last")


def test_a_saved_config_reads_with_todays_defaults_or_not_at_all():
    """One reading of a saved config for a resume and for val/predict/export: a key added
    since takes its default, a key this version does not know makes it unreadable."""
    import yaml

    from training.config import load_config
    from training.state import first_difference, saved_config, value_at
    from utils.config import dump_config, to_plain

    cfg = load_config("configs/demo.yaml")
    written = yaml.safe_load(dump_config(cfg))
    assert saved_config(written) == to_plain(cfg)
    del written["model"]["mlp_hidden"]  # saved before the key existed
    assert value_at(saved_config(written), "model.mlp_hidden") == 512
    assert saved_config({**written, "extra": 1}) is None
    other = to_plain(load_config("configs/demo.yaml", ["model.kwargs.depth=3"]))
    assert first_difference(value_at(saved_config(written), "model.kwargs"),
                            value_at(other, "model.kwargs"), path="model.kwargs") \
        == "model.kwargs.depth"


@pytest.mark.parametrize("edit, message", [
    (lambda s: dict(s, epoch_index=True), "'epoch_index' must be a count (an integer >= 0)"),
    (lambda s: dict(s, progress=dict(s["progress"], elapsed=float("inf"))),
     "'progress.elapsed' must be a finite number, got inf"),
    (lambda s: dict(s, progress=dict(s["progress"], sums={"loss": "1"})),
     "'progress.sums.loss' must be a finite number"),
    (lambda s: dict(s, updates={"ema": -1}), "'updates.ema' must be a count"),
    (lambda s: dict(s, best={"val_top1": 0.5}), "'best' lacks val_num_samples, kind, stage"),
    (lambda s: dict(s, position=dict(s["position"], evaluating=1)),
     "'position.evaluating' must be true or false"),
    (lambda s: dict(s, teacher={"weights": 3, "sha256": "x"}),
     "'teacher' must name a weights file and its sha256"),
    (lambda s: dict(s, data=7), "'data' must be the data's fingerprint or null"),
    (lambda s: {k: v for k, v in s.items() if k != "progress"}, "'the state' lacks progress"),
])
def test_the_state_check_is_read_from_the_state_dataclasses(edit, message):
    """Every key of state.json is checked as its field declares it (and keys that older
    checkpoints lack may be absent)."""
    written = _busy_state().to_json()
    with pytest.raises(ValueError) as caught:
        RunState.from_json(edit(written))
    assert message in str(caught.value)
    older = {k: v for k, v in written.items() if k not in ("records", "tested", "teacher", "data")}
    assert RunState.from_json(older).records == written["epoch_index"]
