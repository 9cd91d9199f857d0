"""utils/runtime/device.py: the device, deterministic kernels (train.deterministic) and the
allocator's peaks."""

import os
import subprocess
import sys

import paddle
import pytest
from conftest import HANG_S, ROOT

from utils.errors import UserError
from utils.runtime import device


def test_deterministic_kernels_need_no_flag_on_a_cpu_build():
    """Paddle's CPU build has no FLAGS_cudnn_deterministic (set_flags refuses it); its
    kernels are deterministic, so the setting passes."""
    with pytest.raises(ValueError):
        paddle.set_flags(device.DETERMINISTIC_FLAGS)
    assert device.select_device(deterministic=True) == "cpu"


def test_a_gpu_build_that_refuses_the_flags_must_have_them_from_the_environment(monkeypatch):
    monkeypatch.setattr(device, "gpu_visible", lambda: True)
    monkeypatch.setattr(paddle, "set_device", lambda name: None)
    for name in device.DETERMINISTIC_FLAGS:  # restored after the test
        monkeypatch.setenv(name, "0")
    with pytest.raises(UserError, match="start the run with FLAGS_cudnn_deterministic=1 "
                                        "FLAGS_embedding_deterministic=1"):
        device.select_device(deterministic=True)
    device.deterministic_environment()
    assert os.environ["FLAGS_cudnn_deterministic"] == "1"
    device.select_device(deterministic=True)  # read at import: nothing more to do
    applied = []
    monkeypatch.setattr(paddle, "set_flags", applied.append)
    device.select_device(deterministic=True)
    assert applied == [device.DETERMINISTIC_FLAGS]


@pytest.mark.slow
def test_main_puts_the_flags_in_the_environment_before_paddle_is_imported():
    """Paddle reads its flags from the environment when imported: main() sets them first."""
    code = ("import os, sys, main\n"
            "real = main.load_config\n"
            "def load(*args):\n"
            "    cfg = real(*args)\n"
            "    print('paddle imported:', 'paddle' in sys.modules)\n"
            "    return cfg\n"
            "main.load_config = load\n"
            "main.main(['-c', 'configs/demo.yaml', '-o', 'train.deterministic=true',\n"
            "           '--dry-run'])\n"
            "print('flag', os.environ.get('FLAGS_cudnn_deterministic'))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert "paddle imported: False" in lines and lines[-1] == "flag 1"
