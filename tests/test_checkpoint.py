"""The resume checkpoint a run leaves in last/: an edited state.json or changed bytes are
one line, never a resume from damaged state."""

import json
import os
import subprocess

import pytest
from conftest import (
    DEMO_CLI,
    FAST_CLI,
    assert_one_error,
    run_script,
)


def _resume(out):
    return run_script("main.py", *DEMO_CLI, *FAST_CLI, "-o", f"train.output_dir={out}", "--resume")


STATE_EDITS = {
    "a list": (lambda s: [], "no complete checkpoint"),
    "empty": (lambda s: {}, "no complete checkpoint"),
    "no position": (lambda s: {k: v for k, v in s.items() if k != "position"},
                    "lacks position"),
    "negative step": (lambda s: dict(s, global_step=-3), "'global_step' must be a count"),
    "negative records": (lambda s: dict(s, records=-1), "'records' must be a count"),
    "stage -1": (lambda s: dict(s, position=dict(s["position"], stage=-1)),
                 "'position.stage' must be a count"),
    "micro 1e9": (lambda s: dict(s, position=dict(s["position"], stage=1, micro=10 ** 9),
                                 progress=None), "micro-batch 1000000000"),
    "micro a float": (lambda s: dict(s, position=dict(s["position"], micro=1e9)),
                      "'position.micro' must be a count"),
    "stage 9": (lambda s: dict(s, position=dict(s["position"], stage=9)),
                "position stage 9 epoch 0 is not in the config's stages"),
    "best a string": (lambda s: dict(s, best="x"), "'best' must be a mapping"),
    "files outside": (lambda s: dict(s, files=["../../escape"]), "no complete checkpoint"),
    "nan progress": (lambda s: dict(s, progress={"micro": 0, "seen": 1, "elapsed": 0.0,
                                                 "excluded": 0, "sums": {"loss": float("nan"),
                                                                         "ce": 0, "kl": 0}}),
                     "is not valid JSON (the non-standard number NaN)"),
}


@pytest.mark.slow
@pytest.mark.parametrize("edit", sorted(STATE_EDITS))
def test_an_edited_state_json_is_one_line(trained, tmp_path, edit):
    change, message = STATE_EDITS[edit]
    copy = str(tmp_path / "copy")
    subprocess.run(["cp", "-r", trained, copy], check=True)
    path = os.path.join(copy, "last", "state.json")
    with open(path, encoding="utf-8") as handle:
        state = json.load(handle)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(change(state)))
    assert_one_error(_resume(copy), message)


@pytest.mark.slow
def test_a_checkpoint_whose_bytes_changed_is_refused(trained, tmp_path):
    copy = str(tmp_path / "copy")
    subprocess.run(["cp", "-r", trained, copy], check=True)
    path = os.path.join(copy, "last", "raw.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-100] ^= 0x04  # one bit of one weight
    open(path, "wb").write(bytes(data))
    assert_one_error(_resume(copy), "raw.safetensors is damaged: its bytes no longer match")
    best = os.path.join(copy, "best.safetensors")
    data = bytearray(open(best, "rb").read())
    data[len(data) // 2] ^= 0x80
    open(best, "wb").write(bytes(data))
    assert_one_error(run_script("val.py", *DEMO_CLI, "-o", f"train.output_dir={copy}"),
                     "best.safetensors is damaged")
