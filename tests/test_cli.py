"""utils/cli.py and the signals around it: every expected failure of an entry point is one
error line and an exit code (a full disk, a closed pipe, SIGTERM while Paddle loads,
names a terminal cannot show); --debug shows the traceback."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import (
    DEMO_CLI,
    FAST_CLI,
    HANG_S,
    ROOT,
    assert_one_error,
    cut_in_half,
    out_args,
    png_file,
    run_script,
    tiny_weights_file,
)

from models.build import build_model
from training.config import load_config
from utils.io.tensor_io import save_tensors


def _has_loaded_paddle(pid):
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8") as handle:
            return "libpaddle" in handle.read()
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_as_soon_as_paddle_is_loaded_is_one_line(tmp_path):
    """Paddle's import installs a C++ SIGTERM handler that printed a "FatalError" dump; a
    SIGTERM from then on, while the rest imports and the data loads, ends in one line."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *DEMO_CLI,
                             *out_args(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + HANG_S
    while not _has_loaded_paddle(proc.pid) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=HANG_S)
    assert "FatalError" not in stderr and "C++ Traceback" not in stderr, stderr[-2000:]
    assert proc.returncode == 143, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith(("error: interrupted (SIGTERM)",
                                                       "interrupted: SIGTERM"))


NO_SPACE = """
import errno, os, runpy, sys
def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
import utils.checkpoint
utils.checkpoint.save_tensors = full
sys.argv = ["main.py", *sys.argv[1:]]
runpy.run_path("main.py", run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("package", ["PIL", "yaml", "paddle"])
def test_a_python_without_the_projects_packages_says_so_in_one_line(tmp_path, package):
    """A new terminal where the environment is not active: the command names the Python it
    ran with and how to get the packages, without a traceback."""
    (tmp_path / "sitecustomize.py").write_text(f"import sys\nsys.modules[{package!r}] = None\n")
    for script in ("main.py", "val.py"):
        proc = run_script(script, *DEMO_CLI, env={"PYTHONPATH": str(tmp_path)})
        assert_one_error(proc, f"this Python ({sys.executable}) has no {package!r}",
                         ". .venv/bin/activate", "pip install -r requirements.txt", code=1)


@pytest.mark.slow
def test_a_full_disk_before_any_checkpoint_says_none_was_kept(tmp_path):
    proc = subprocess.run([sys.executable, "-c", NO_SPACE, *DEMO_CLI, *FAST_CLI, *out_args(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    line = assert_one_error(proc, "No space left on device", "no checkpoint was saved there yet")
    assert "None" not in line and "previous checkpoint" not in line


@pytest.mark.slow
def test_no_space_without_a_file_name_says_no_none():
    code = ("import errno, os, sys; sys.path.insert(0, '.')\n"
            "from utils import cli\n"
            "def main():\n    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
            "cli.run(main)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert_one_error(proc, "No space left on device")
    assert "None" not in proc.stderr


@pytest.mark.slow
def test_class_names_a_terminal_cannot_show_are_escaped_not_a_traceback(tmp_path):
    import paddle

    paddle.seed(0)
    weights = str(tmp_path / "w.safetensors")
    names = ["猫", "犬", "鳥", "魚", "牛", "馬", "羊", "豚", "鶏", "兎"]
    save_tensors(weights, build_model(load_config("configs/demo.yaml").model).state_dict(),
                 {"class_names": names})
    image = png_file(tmp_path / "x.png", width=16, height=16, value=128)
    proc = run_script("predict.py", "-c", "configs/demo.yaml", str(image), "--weights", weights,
                      env={"PYTHONIOENCODING": "ascii"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\\u" in proc.stdout and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_closed_pipe_ends_quietly():
    proc = subprocess.run(f"{sys.executable} main.py -c configs/demo.yaml --dry-run | head -1",
                          shell=True, cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    assert proc.stdout.startswith("data: ") and proc.stdout.count("\n") == 1
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_debug_flag_shows_the_traceback(tmp_path):
    path = cut_in_half(tiny_weights_file(tmp_path, "w.safetensors"))
    proc = run_script("val.py", *DEMO_CLI, "--weights", path, "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
