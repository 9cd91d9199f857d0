"""Export for Paddle Inference (``paddle.jit.save``) and prediction through the exported model.

The exported graph takes what the eager model takes: float32 ``[B, 3, S, S]`` images,
already resized and normalised. ``preprocess.json`` beside it records that contract
(size, crop fraction, bicubic resize, mean and std, class names), and :class:`ExportedModel` reads it
back, so ``predict.py`` prepares images the same way for both paths.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import sys
import tempfile
from typing import TYPE_CHECKING, Optional

import numpy as np

from data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from utils.errors import UserError
from utils.io.files import (
    ensure_folder,
    fsync_dir,
    path_problem,
    read_json,
    refuse_link,
    write_json,
)
from utils.runtime.device import gpu_visible, paddle_version
from utils.schema import MAX_IMAGE_SIZE, MIN_CROP_FRACTION

if TYPE_CHECKING:
    import paddle

MODEL_PREFIX = "model"
CONTRACT = "preprocess.json"
# Paddle 3's conversion to its static graph (PIR) logs this from C++ for an op that writes into
# a tensor it is given; the exported graph is unaffected (tested against eager), so the line,
# which reads like a failure, is left out.
HARMLESS_NATIVE_LINE = "not support input out tensor"
SELF_ATTENTION_FUSION = "self_attention_fuse_pass"


@contextlib.contextmanager
def _native_lines_without(fragment):
    """What Paddle's C++ code writes to the standard error inside the block (it bypasses
    ``sys.stderr``), passed on without the lines holding ``fragment``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode("utf-8", "replace").splitlines(True)
                    if fragment not in line]
            sys.stderr.write("".join(kept))


def export_model(model: paddle.nn.Layer, image_size: int, out_dir: str, class_names: list[str],
                 crop_fraction: float = 1.0, weights: Optional[str] = None) -> str:
    """Save ``model`` (eval mode) as a static graph for ``image_size`` inputs, plus its contract
    (evaluation's view: the shorter side resized to ``image_size / crop_fraction``, the centre
    cropped) and the file of the ``weights`` it holds."""
    import paddle
    from paddle.static import InputSpec

    ensure_folder(out_dir, "the export folder")
    if not os.access(out_dir, os.W_OK):
        raise UserError(f"the export folder {out_dir} is not writable; choose another --out")
    for path in [*glob.glob(os.path.join(out_dir, MODEL_PREFIX + ".*")),
                 os.path.join(out_dir, CONTRACT)]:
        refuse_link(path, "the export file")
        if os.path.isdir(path):
            raise UserError(f"the export file {path} is a folder; remove it or choose another "
                            f"--out")
    needed = sum(int(np.prod(p.shape)) * 4 for p in model.parameters()) + (1 << 20)
    free = shutil.disk_usage(out_dir).free
    if free < needed:  # before any file: Paddle's own error for a full disk is not one line
        raise OSError(errno.ENOSPC, f"No space left on device (an export needs about "
                                    f"{needed / 1e6:.1f} MB, {free / 1e6:.1f} MB free)", out_dir)
    model.eval()
    spec = InputSpec([None, 3, image_size, image_size], "float32", name="image")
    # Written as a set in a folder beside the export, moved into place once whole: a failure
    # (a full disk) leaves the export that was there as it was.
    staging = tempfile.mkdtemp(prefix=".export-", dir=out_dir)
    try:
        with _native_lines_without(HARMLESS_NATIVE_LINE):
            paddle.jit.save(paddle.jit.to_static(model, input_spec=[spec], full_graph=True),
                            os.path.join(staging, MODEL_PREFIX))
        write_json(os.path.join(staging, CONTRACT), {
            "input": "float32 [batch, 3, image_size, image_size], RGB",
            "image_size": image_size, "crop_fraction": crop_fraction,
            "resize": "shorter side to round(image_size / crop_fraction), bicubic (PIL), "
                      "centre crop of image_size, then uint8 RGB / 255",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "output": "logits [batch, num_classes]", "class_names": list(class_names),
            "weights": weights and os.path.abspath(weights),
        })
        written = sorted(os.listdir(staging), key=lambda name: name == CONTRACT)  # it last
        for old in glob.glob(os.path.join(out_dir, MODEL_PREFIX + ".*")):
            if os.path.basename(old) not in written:  # another Paddle's file names
                os.remove(old)
        for name in written:
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
        fsync_dir(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _checked_contract(contract, path):
    """``preprocess.json`` as export_model writes it: the size, class names and the
    normalisation this project applies (predict.py prepares images by it)."""
    size = contract.get("image_size") if isinstance(contract, dict) else None
    names = contract.get("class_names") if isinstance(contract, dict) else None
    fraction = contract.setdefault("crop_fraction", 1.0) if isinstance(contract, dict) else None
    if (type(size) is not int or not 1 <= size <= MAX_IMAGE_SIZE or not isinstance(names, list)
            or type(fraction) not in (int, float)
            or not MIN_CROP_FRACTION <= fraction <= 1
            or not names or not all(isinstance(n, str) for n in names)
            or len(set(names)) != len(names)):
        raise UserError(f"{path} is damaged (it needs an image_size of 1 to {MAX_IMAGE_SIZE}, "
                        f"a crop_fraction in [{MIN_CROP_FRACTION}, 1] and distinct "
                        f"class_names); run python "
                        f"export.py again")
    if contract.get("mean") != list(IMAGENET_MEAN) or contract.get("std") != list(IMAGENET_STD):
        raise UserError(f"{path} asks for another normalisation than this project's "
                        f"(mean {list(IMAGENET_MEAN)}, std {list(IMAGENET_STD)}); run python "
                        f"export.py again")
    return contract


def predictor_config(graph: str, params: str) -> paddle.inference.Config:
    """Paddle Inference's settings for an exported model: on the GPU when one is visible,
    else on the CPU. Paddle 2's CPU pass that fuses self-attention (``self_attention_fuse_pass``)
    ends the process with an illegal instruction on processors without AVX-512 (Paddle issues
    64852 and 70156; Paddle 3 checks the processor first), so it is left out there: the
    predictions are the same, through the unfused operators."""
    import paddle.inference as inference

    config = inference.Config(graph, params)
    if gpu_visible():
        config.enable_use_gpu(256, 0)  # initial memory pool (MB), device 0
    else:
        config.disable_gpu()
        if paddle_version() < (3, 0, 0):
            config.delete_pass(SELF_ATTENTION_FUSION)
    config.disable_glog_info()
    return config


class ExportedModel:
    """An exported model run by ``paddle.inference``; call it on preprocessed float32 images."""

    def __init__(self, model_dir: str) -> None:
        import paddle.inference as inference

        problem = path_problem(model_dir, "folder")
        if problem:
            raise UserError(f"--model-dir {model_dir} {problem}")
        contract = read_json(os.path.join(model_dir, CONTRACT))
        graphs = sorted(path for name in (".json", ".pdmodel")
                        for path in glob.glob(os.path.join(model_dir, MODEL_PREFIX + name))
                        if not path_problem(path))
        params = os.path.join(model_dir, MODEL_PREFIX + ".pdiparams")
        if contract is None or not graphs or path_problem(params):
            raise UserError(f"{model_dir} holds no exported model (model.json or model.pdmodel, "
                            f"model.pdiparams, {CONTRACT}); run python export.py first")
        self.contract = _checked_contract(contract, os.path.join(model_dir, CONTRACT))
        try:
            self.predictor = inference.create_predictor(predictor_config(graphs[0], params))
        except Exception as exc:  # noqa: BLE001 - Paddle raises RuntimeError and kin
            raise UserError(f"the exported model in {model_dir} cannot be loaded "
                            f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); it is "
                            f"damaged: run python export.py again") from None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Logits of a float32 ``[B, 3, S, S]`` array."""
        handle = self.predictor.get_input_handle(self.predictor.get_input_names()[0])
        handle.reshape(list(images.shape))
        handle.copy_from_cpu(np.ascontiguousarray(images, dtype=np.float32))
        try:
            self.predictor.run()
        except Exception as exc:  # noqa: BLE001 - a graph that loads but cannot run
            raise UserError(f"the exported model cannot run on {list(images.shape)} images "
                            f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); run "
                            f"python export.py again") from None
        return self.predictor.get_output_handle(self.predictor.get_output_names()[0]).copy_to_cpu()

    def describe(self, model_dir: str) -> str:
        """One line naming the exported model: its folder, the weights it was exported from,
        its classes and input size."""
        weights = self.contract.get("weights")
        source = f"exported from {weights}" if isinstance(weights, str) else \
            "the weights it was exported from are not recorded"
        return (f"model {model_dir}: {source}; {len(self.contract['class_names'])} classes, "
                f"{self.contract['image_size']} px")
