"""Shared test helpers: project imports, a tiny PPIM model config and CLI subprocesses."""

import os
import subprocess
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore", message="No ccache found")

# A 2-block, 64-wide distilled ViT at 32 px: PPIM's own class, small enough for CPU tests.
TINY_MODEL_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2,
                     "num_heads": 2, "mlp_ratio": 2, "qkv_bias": True, "epsilon": 1e-6}


def run_script(script, *args, env=None, timeout=600):
    """Run ``python <script> args...`` from the project root; return the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT,
                          env=dict(os.environ, **(env or {})), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def tiny_model_cfg():
    """A validated ``model`` section for the tiny distilled ViT (random init, 10 classes)."""
    from utils.config import validate
    from utils.schema import MODEL

    return validate({"name": "DistilledVisionTransformer", "pretrained": False,
                     "num_classes": 10, "drop_rate": 0.1, "kwargs": dict(TINY_MODEL_KWARGS)},
                    MODEL, "model")
