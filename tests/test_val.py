"""val.py: the kinds of weights a run kept, damaged run configs and bad weights files, each
one error line."""

import numpy as np
import pytest
from conftest import (
    DEMO_CLI,
    assert_one_error,
    cut_in_half,
    run_script,
    small_demo_config,
    tiny_weights_file,
)

from main import train


@pytest.mark.parametrize("damaged", ["train: 5\n", "train: {ema: [1]}\n", "train: {ema: 3}\n"])
def test_val_kind_reads_a_damaged_run_config_without_a_traceback(tmp_path, damaged):
    from val import _kept_average

    (tmp_path / "config.yaml").write_text(damaged)
    assert _kept_average(str(tmp_path), "ema") is True  # then the weights decide


@pytest.mark.slow
def test_asking_for_an_average_the_run_did_not_keep_says_so(tmp_path):
    out = str(tmp_path / "run")
    train(small_demo_config(out, "stages.1.epochs=1"))
    assert_one_error(run_script("val.py", *DEMO_CLI, "-o", f"train.output_dir={out}", "--kind",
                                "swa"),
                     "--kind swa: SWA is off in the run in", "train.swa.enabled: false")


WEIGHT_ROWS = {
    "missing file": (lambda tmp: str(tmp / "nope.safetensors"), "no weights at", "--weights"),
    "truncated safetensors": (lambda tmp: cut_in_half(tiny_weights_file(tmp, "w.safetensors")),
                              "is truncated or not a safetensors file"),
    "truncated pdparams": (lambda tmp: cut_in_half(tiny_weights_file(tmp, "w.pdparams")),
                           "is truncated or not a pickle file"),
    "another model": (lambda tmp: tiny_weights_file(tmp, "w.safetensors", embed_dim=32),
                      "does not fit this model", "blocks.0.attn.qkv.bias: shape [96] != model [192]"),
}


@pytest.mark.slow
@pytest.mark.parametrize("row", sorted(WEIGHT_ROWS))
def test_bad_weights_for_val_are_one_error_line(tmp_path, row):
    make, *fragments = WEIGHT_ROWS[row]
    assert_one_error(run_script("val.py", *DEMO_CLI, "--weights", make(tmp_path)), *fragments)


@pytest.mark.slow
def test_a_run_trained_with_another_model_is_refused_and_a_run_folder_is_accepted(trained,
                                                                                  tmp_path):
    """The run in train.output_dir must have been trained with this config's model: its
    best weights are not read as another's. --weights takes a run folder too."""
    proc = run_script("val.py", *DEMO_CLI, "-o", f"train.output_dir={trained}",
                      "-o", "model.num_classes=9")
    assert_one_error(proc, f"the run in {trained} was trained with another model.num_classes "
                           f"(10, here 9)", "--weights PATH")
    proc = run_script("val.py", *DEMO_CLI, "--weights", str(trained))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "best.safetensors" in proc.stdout and "top1=" in proc.stdout


@pytest.mark.slow
def test_a_run_folder_as_the_config_reads_its_config_and_weights(trained, tmp_path):
    """``-c RUN_FOLDER``: the run's own config.yaml, the folder as train.output_dir (even
    after the folder has moved), its best weights named in the output."""
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(trained, moved)
    proc = run_script("val.py", "-c", str(moved))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{moved}/best.safetensors" in proc.stdout and "top1=" in proc.stdout
    # predict.py and export.py the same way.
    from PIL import Image
    from sklearn.datasets import load_digits

    image = tmp_path / "digit.png"
    scan = (load_digits().images[0] * 255 / 16).astype(np.uint8)
    Image.fromarray(scan).resize((32, 32)).convert("RGB").save(image)
    proc = run_script("predict.py", "-c", str(moved), str(image))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{moved}/best.safetensors" in proc.stdout and "digit.png" in proc.stdout
    proc = run_script("export.py", "-c", str(moved))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{moved}/best.safetensors" in proc.stdout
    assert (moved / "inference" / "preprocess.json").is_file()
