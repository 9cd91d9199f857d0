"""utils/runtime/invocation.py: the command that continues a run, as it was started: its
interpreter, main.py by path, the folder, the options as given, the output redirection and
the background form (nohup ... &)."""

import os
import shlex
import subprocess
import sys

import pytest
from conftest import HANG_S, ROOT

# Prints the resume command of a run started with these options, as main.py builds it.
PRINT_COMMAND = ("import sys; sys.path.insert(0, sys.argv[1]); "
                 "from utils.runtime.invocation import resume_command; "
                 "print(resume_command('main.py', ['-c', 'my config.yaml', '-o', "
                 "'train.seed=1']), file=sys.stderr)")


def _started(shell_line, folder):
    """Run ``shell_line`` (which starts PRINT_COMMAND as $RUN) with bash in ``folder``."""
    run = f"{shlex.quote(sys.executable)} -c {shlex.quote(PRINT_COMMAND)} {shlex.quote(ROOT)}"
    return subprocess.run(["bash", "-c", shell_line.replace("$RUN", run)], cwd=str(folder),
                          capture_output=True, text=True, timeout=HANG_S)


def _expected(folder, start="", end=""):
    main = shlex.join([sys.executable, os.path.join(ROOT, "main.py"), "-c", "my config.yaml",
                       "-o", "train.seed=1", "--resume"])
    return f"cd {shlex.quote(str(folder))} && {start}{main}{end}"


@pytest.mark.slow
def test_a_plain_run_resumes_with_its_interpreter_and_main_py_by_path_from_any_folder(
        tmp_path):
    """Pasted into a shell in another folder, the command still finds main.py and the
    options' relative paths (it reports the config file it looked for where it was made)."""
    proc = _started("$RUN", tmp_path)
    command = proc.stderr.strip()
    assert proc.returncode == 0 and command == _expected(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    pasted = subprocess.run(["bash", "-c", command], cwd=str(other), capture_output=True,
                            text=True, timeout=HANG_S)
    assert pasted.returncode == 2 and "Traceback" not in pasted.stderr
    assert "config file my config.yaml does not exist" in pasted.stderr


@pytest.mark.slow
def test_a_run_writing_to_files_resumes_writing_to_them(tmp_path):
    proc = _started("$RUN > out.log 2> err.log", tmp_path)
    assert proc.returncode == 0
    assert (tmp_path / "err.log").read_text().strip() == _expected(
        tmp_path, end=f" >> {tmp_path}/out.log 2>> {tmp_path}/err.log")


@pytest.mark.slow
def test_a_nohup_background_run_resumes_in_the_background_into_its_log(tmp_path):
    """The documented long-run form: ``nohup python main.py ... >> train.log 2>&1 &``."""
    proc = _started("nohup $RUN >> train.log 2>&1 & wait", tmp_path)
    assert proc.returncode == 0
    assert (tmp_path / "train.log").read_text().strip().splitlines()[-1] == _expected(
        tmp_path, start="nohup ", end=f" >> {tmp_path}/train.log 2>&1 &")
