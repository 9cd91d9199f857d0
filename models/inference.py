"""Export for Paddle Inference (``paddle.jit.save``) and prediction through the exported model.

The exported graph takes what the eager model takes: float32 ``[B, 3, S, S]`` images,
already resized and normalised. ``preprocess.json`` beside it records that contract
(size, bicubic resize, mean and std, class names), and :class:`ExportedModel` reads it
back, so ``predict.py`` prepares images the same way for both paths.
"""

import glob
import os

import numpy as np

from data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from utils.errors import UserError
from utils.files import read_json, write_json

MODEL_PREFIX = "model"
CONTRACT = "preprocess.json"


def export_model(model, image_size, out_dir, class_names):
    """Save ``model`` (eval mode) as a static graph for ``image_size`` inputs, plus its contract."""
    import paddle
    from paddle.static import InputSpec

    os.makedirs(out_dir, exist_ok=True)
    model.eval()
    spec = InputSpec([None, 3, image_size, image_size], "float32", name="image")
    paddle.jit.save(paddle.jit.to_static(model, input_spec=[spec], full_graph=True),
                    os.path.join(out_dir, MODEL_PREFIX))
    write_json(os.path.join(out_dir, CONTRACT), {
        "input": "float32 [batch, 3, image_size, image_size], RGB",
        "image_size": image_size, "resize": "bicubic (align_corners=false) from uint8 RGB / 255",
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "output": "logits [batch, num_classes]", "class_names": list(class_names),
    })
    return out_dir


class ExportedModel:
    """An exported model run by ``paddle.inference``; call it on preprocessed float32 images."""

    def __init__(self, model_dir):
        import paddle
        import paddle.inference as inference

        contract = read_json(os.path.join(model_dir, CONTRACT))
        graphs = sorted(glob.glob(os.path.join(model_dir, MODEL_PREFIX + ".json"))
                        + glob.glob(os.path.join(model_dir, MODEL_PREFIX + ".pdmodel")))
        params = os.path.join(model_dir, MODEL_PREFIX + ".pdiparams")
        if contract is None or not graphs or not os.path.isfile(params):
            raise UserError(f"{model_dir} holds no exported model (model.json or model.pdmodel, "
                            f"model.pdiparams, {CONTRACT}); run python export.py first")
        self.contract = contract
        config = inference.Config(graphs[0], params)
        if paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
            config.enable_use_gpu(256, 0)  # initial memory pool (MB), device 0
        else:
            config.disable_gpu()
        config.disable_glog_info()
        self.predictor = inference.create_predictor(config)

    def __call__(self, images):
        """Logits of a float32 ``[B, 3, S, S]`` array."""
        handle = self.predictor.get_input_handle(self.predictor.get_input_names()[0])
        handle.reshape(list(images.shape))
        handle.copy_from_cpu(np.ascontiguousarray(images, dtype=np.float32))
        self.predictor.run()
        return self.predictor.get_output_handle(self.predictor.get_output_names()[0]).copy_to_cpu()
