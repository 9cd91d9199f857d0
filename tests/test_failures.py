"""Bad input, fed to main.py and val.py as a user would: one ``error:`` line, no traceback,
nothing executed from a file, checkpoints kept.

Rows (and docs/troubleshooting.md's table): untrusted pickles, config values, data
files, weight files, a diverging loss.
"""

import builtins
import os
import pickle

import numpy as np
import paddle
import pytest
from conftest import (
    assert_one_error,
    cifar_batch,
    run_script,
    tiny_model_config,
    write_cifar_archive,
)

from data.digits import load_digits
from models.build import build_model
from utils.checkpoint import find_last, load_last
from utils.io.tensor_io import save_tensors

DEMO = ["-c", "configs/demo.yaml"]
FAST = ["-o", "data.train_subset=256", "-o", "data.val_subset=100", "-o", "data.batch_size=32"]


class Payload:
    """Pickles as "call ``function(argument)``": what a malicious file does when loaded."""

    def __init__(self, function, argument):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


PAYLOADS = {  # the function, its argument given a marker path, the global the pickle names
    "os.system": (os.system, lambda marker: f"touch {marker}", "posix.system"),
    "builtins.exec": (builtins.exec, lambda marker: f"open({str(marker)!r}, 'w').close()",
                      "builtins.exec"),
}


def _evil_pickle(kind, marker):
    function, argument, _ = PAYLOADS[kind]
    return pickle.dumps({"pos_embed": np.zeros((1, 2), np.float32),
                         "extra": Payload(function, argument(marker))}, protocol=4)


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_weights_pickle_with_code_is_refused_and_never_runs(tmp_path, kind):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pdparams"
    evil.write_bytes(_evil_pickle(kind, marker))
    pickle.loads(_evil_pickle(kind, tmp_path / "live"))  # the file is live: plain pickle runs it
    assert (tmp_path / "live").exists()
    forbidden = PAYLOADS[kind][2]
    proc = run_script("val.py", *DEMO, "--weights", str(evil))
    assert_one_error(proc, f"asks to call {forbidden} while loading", "refusing to load it")
    proc = run_script("main.py", *DEMO, *FAST, "-o", f"model.pretrained={evil}",
                      "-o", f"train.output_dir={tmp_path / 'out'}")
    assert_one_error(proc, forbidden)
    assert not marker.exists()


def _digit_batch(mode, count):
    images, labels = load_digits(mode)
    return cifar_batch(images[:count], labels[:count])


def _archive(path, **members):
    """A small CIFAR-format archive of real digit images; ``members`` replace the defaults."""
    content = {"meta": {b"fine_label_names": [f"c{i}".encode() for i in range(100)]},
               "train": _digit_batch("train", 300), "test": _digit_batch("test", 100)}
    content.update(members)
    return write_cifar_archive(path, content)


def _train_on(archive, tmp_path, *extra):
    return run_script("main.py", *DEMO, "-o", "data.name=cifar100", "-o", f"data.path={archive}",
                      "-o", f"train.output_dir={tmp_path / 'out'}", *extra)


def test_cifar_archive_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    archive = _archive(tmp_path / "evil.tar.gz",
                       train=Payload(os.system, f"touch {marker}"))
    assert_one_error(_train_on(archive, tmp_path), "member cifar-100-python/train",
                     "asks to call posix.system")
    assert not marker.exists()


def _truncated(tmp_path):
    whole = _archive(tmp_path / "whole.tar.gz")
    path = tmp_path / "cut.tar.gz"
    with open(whole, "rb") as handle:
        data = handle.read()
    path.write_bytes(data[:len(data) // 2])
    return str(path)


def _not_an_archive(tmp_path):
    path = tmp_path / "random.tar.gz"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    return str(path)


DATA_ROWS = {
    "missing path": (lambda tmp: str(tmp / "nope.tar.gz"), "data.path", "does not exist"),
    "truncated archive": (_truncated, "is damaged or truncated", "download"),
    "not an archive": (_not_an_archive, "is damaged or truncated", "download cifar-100"),
    "wrong image shape": (lambda tmp: _archive(tmp / "a.tar.gz", test={
        b"data": np.zeros((10, 1000), np.uint8), b"fine_labels": [0] * 10}),
        "shape [10, 1000]", "3x32x32 = 3072"),
    "labels outside the head": (lambda tmp: _archive(tmp / "a.tar.gz", test=cifar_batch(
        np.zeros((5, 32, 32, 3), np.uint8), np.array([0, 1, 2, 3, 99]))),
        "test split has labels in [0, 99], outside [0, 10)", "model.num_classes"),
    "empty split": (lambda tmp: _archive(tmp / "a.tar.gz", test=cifar_batch(
        np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64))), "'test' split", "is empty"),
}


@pytest.mark.parametrize("row", sorted(DATA_ROWS))
def test_bad_data_is_one_error_line(tmp_path, row):
    make, *fragments = DATA_ROWS[row]
    assert_one_error(_train_on(make(tmp_path), tmp_path), *fragments)


def test_subset_larger_than_the_split_is_one_error_line(tmp_path):
    proc = run_script("main.py", *DEMO, "-o", "data.train_subset=5000",
                      "-o", f"train.output_dir={tmp_path}")
    assert_one_error(proc, "data.train_subset=5000 must be between 1 and the split size 1197")


CONFIG_ROWS = [
    ("loss.alpha=-1", "'loss.alpha' must be >= 0.0"),
    ("data.hflip_prob=1.5", "'data.hflip_prob' must be <= 1.0"),
    ("data.batch_size=0", "'data.batch_size' must be >= 1"),
    ("stages.0.optimizer.name=SGD", "'stages.0.optimizer.name' must be one of AdamW, Momentum"),
    ("stages.1.optimizer.momentum=1.5", "'stages.1.optimizer.momentum' must be <= 1.0"),
    ("stages.0.optimizer.betas=[0.9, 2]", "'stages.0.optimizer.betas.1' must be <= 1.0"),
    ("stages.0.until.val_top1=93", "'stages.0.until.val_top1' must be <= 1.0"),
    ("model.drop_rate=high", "'model.drop_rate' must be float, got str"),
    ("train.nan_policy=ignore", "'train.nan_policy' must be one of stop, skip"),
    ("train.sede=1", "'train.sede' is unknown; valid keys at train: output_dir, seed"),
]


@pytest.mark.parametrize("override,message", CONFIG_ROWS)
def test_bad_config_value_names_the_key(override, message):
    assert_one_error(run_script("main.py", *DEMO, "-o", override, "--dry-run"), message)


def _tiny_weights(tmp_path, name, **kwargs):
    """Weights of the demo's tiny model (or of a variant with ``kwargs``) as ``name``."""
    paddle.seed(0)
    model = build_model(tiny_model_config(kwargs))
    path = str(tmp_path / name)
    if name.endswith(".pdparams"):
        paddle.save(model.state_dict(), path)
    else:
        save_tensors(path, model.state_dict())
    return path


def _cut(path):
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[:len(data) // 2])
    return path


WEIGHT_ROWS = {
    "missing file": (lambda tmp: str(tmp / "nope.safetensors"), "no weights at", "--weights"),
    "truncated safetensors": (lambda tmp: _cut(_tiny_weights(tmp, "w.safetensors")),
                              "is truncated or not a safetensors file"),
    "truncated pdparams": (lambda tmp: _cut(_tiny_weights(tmp, "w.pdparams")),
                           "is truncated or not a pickle file"),
    "another model": (lambda tmp: _tiny_weights(tmp, "w.safetensors", embed_dim=32),
                      "does not fit this model", "blocks.0.attn.qkv.bias: shape [96] != model [192]"),
}


@pytest.mark.parametrize("row", sorted(WEIGHT_ROWS))
def test_bad_weights_for_val_are_one_error_line(tmp_path, row):
    make, *fragments = WEIGHT_ROWS[row]
    assert_one_error(run_script("val.py", *DEMO, "--weights", make(tmp_path)), *fragments)


def test_pretrained_weights_of_another_model_name_mismatched_tensors(tmp_path):
    other = _tiny_weights(tmp_path, "other.pdparams", embed_dim=32)
    proc = run_script("main.py", *DEMO, *FAST, "-o", f"model.pretrained={other}",
                      "-o", f"train.output_dir={tmp_path / 'out'}")
    assert_one_error(proc, "is for another model (", "e.g. pos_embed: shape [1, 18, 32] "
                     "!= model [1, 18, 64]", "model.name or model.kwargs")


def test_debug_flag_shows_the_traceback(tmp_path):
    path = _cut(_tiny_weights(tmp_path, "w.safetensors"))
    proc = run_script("val.py", *DEMO, "--weights", path, "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


DIVERGE = [*DEMO, *FAST, "-o", "stages.0.warmup.epochs=0", "-o", "stages.0.optimizer.lr=1e30",
           "-o", "train.save_every_steps=1"]


def test_divergence_stops_naming_where_and_keeps_the_last_good_checkpoint(tmp_path):
    out = str(tmp_path / "out")
    proc = run_script("main.py", *DIVERGE, "-o", f"train.output_dir={out}")
    assert_one_error(proc, "the loss is not finite at stage 0 epoch 1 step 2 (lr 1e+30",
                     f"the last good checkpoint is {out}/last", "lower stages.0.optimizer.lr",
                     "stages.0.warmup.steps", "train.clip_grad_norm", "train.nan_policy=skip")
    state, trees = load_last(find_last(out))
    assert state["global_step"] == 1 and state["position"]["micro"] == 1
    assert all(np.isfinite(array).all() for array in trees["raw"].values())


def test_skipping_non_finite_steps_is_bounded(tmp_path):
    out = str(tmp_path / "out")
    proc = run_script("main.py", *DIVERGE, "-o", f"train.output_dir={out}",
                      "-o", "train.nan_policy=skip", "-o", "train.nan_max_skips=2")
    assert_one_error(proc, "3 steps had a non-finite loss or gradient, more than train.nan_max_skips=2")
    assert proc.stdout.count("skipped the update of stage 0 epoch 1") == 2
