"""utils/io/download.py: offline, every download a run needs is named at once, before
anything is loaded; online, one process fetches a file that several need (the ranks of a
launched run), the others wait for it whole, and a file's name never holds a partial
download."""

import hashlib
import http.server
import os
import subprocess
import sys
import threading
import time

import pytest
from conftest import HANG_S, ROOT

from training.config import load_config
from utils.errors import UserError


def test_offline_every_missing_download_is_named_at_once(monkeypatch):
    import data.cifar as cifar
    import utils.io.download as download
    from data.formats import FORMATS
    from models.build import pending_download as weights_download

    monkeypatch.setattr(cifar, "default_archive_path", lambda c: "/nonexistent/archive.tar.gz")
    monkeypatch.setattr(download, "weights_cached", lambda url: False)
    monkeypatch.setattr(download, "_unreachable", lambda url: "Name or service not known")
    import models.build as build

    monkeypatch.setattr(build, "weights_cached", lambda url: False)
    cfg = load_config("configs/rdrop_deit_b_384_cifar100.yaml")
    needed = [FORMATS[cfg.data.name].download(cfg.data), weights_download(cfg.model)]
    assert all(needed)
    with pytest.raises(UserError) as caught:
        download.ensure_downloadable(needed)
    message = str(caught.value)
    for fragment in ("offline (Name or service not known): 2 download(s) cannot be made",
                     "CIFAR-100: fetch cifar-100-python.tar.gz from https://dataset.bj.bcebos.com",
                     "pass -o data.path=/path/to/cifar-100-python.tar.gz",
                     "fetch DeiT_base_distilled_patch16_384.pdparams from https://",
                     "-o model.pretrained=/path/to/DeiT_base_distilled_patch16_384.pdparams"):
        assert fragment in message, fragment
    assert weights_download(cfg.model, load_pretrained=False) is None  # a resume needs none


def test_offline_with_a_wrong_data_path_names_both_in_one_line(monkeypatch, tmp_path):
    """No internet for the weights and a data.path that is not there: one line names both
    (before, the weights came first and the data path only after they were fixed)."""
    from utils.io import download

    monkeypatch.setattr(download, "_unreachable", lambda url: "Name or service not known")
    import models.build as build

    monkeypatch.setattr(build, "weights_cached", lambda url: False)
    from training.run import run_inputs

    proc_cfg = load_config("configs/rdrop_deit_b_384_cifar100.yaml",
                           [f"data.path={tmp_path}/gone.tar.gz"])
    with pytest.raises(UserError) as caught:
        run_inputs(proc_cfg, resume=False)
    message = str(caught.value)
    assert "1 download(s) cannot be made" in message
    assert f"data.path {tmp_path}/gone.tar.gz does not exist" in message


PAYLOAD = os.urandom(3 << 20)
MD5 = hashlib.md5(PAYLOAD).hexdigest()


class _SlowFile(http.server.BaseHTTPRequestHandler):
    """Serves :data:`PAYLOAD` in 64 KiB pieces over about a second; counts the GETs."""

    gets = []

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).gets.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        for start in range(0, len(PAYLOAD), 1 << 16):
            self.wfile.write(PAYLOAD[start:start + (1 << 16)])
            time.sleep(0.02)

    def log_message(self, *args):
        """Quiet: no request lines on the test's standard error."""


@pytest.fixture
def slow_server():
    _SlowFile.gets = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowFile)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/cifar-100-python.tar.gz", _SlowFile.gets
    server.shutdown()
    server.server_close()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock and the launcher")
def test_two_ranks_download_the_archive_once_and_both_read_it_whole(slow_server, tmp_path):
    url, gets = slow_server
    logs = str(tmp_path / "logs")
    (tmp_path / "home").mkdir()  # Paddle's cache goes under /tmp when HOME is not writable
    env = dict(os.environ, HOME=str(tmp_path / "home"), NO_PROXY="127.0.0.1",
               no_proxy="127.0.0.1")
    env.pop("HTTP_PROXY", None), env.pop("http_proxy", None)
    command = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
               "--log_dir", logs, os.path.join("tests", "download_ranks.py"), url, MD5]
    code = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, timeout=HANG_S).returncode
    texts = [open(os.path.join(logs, f"workerlog.{r}"), encoding="utf-8",
                  errors="replace").read() for r in (0, 1)]
    assert code == 0, texts
    assert len(gets) == 1, gets  # one download for both ranks
    final = str(tmp_path / "home" / ".cache" / "paddle" / "dataset" / "cifar" /
                "cifar-100-python.tar.gz")
    for r, text in enumerate(texts):
        assert f"rank {r} {final} {MD5}" in text, text[-2000:]
    assert "waiting while another process downloads it" in "".join(texts)
    assert sorted(os.listdir(os.path.dirname(final))) == ["cifar-100-python.tar.gz",
                                                           "cifar-100-python.tar.gz.lock"]


@pytest.mark.slow
def test_a_complete_file_is_not_fetched_again(slow_server, tmp_path, monkeypatch):
    import paddle.dataset.common as common

    from utils.io.download import download_dataset

    url, gets = slow_server
    monkeypatch.setattr(common, "DATA_HOME", str(tmp_path / "dataset"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    path = download_dataset(url, "cifar", MD5, "the test archive", "fix: none")
    assert open(path, "rb").read() == PAYLOAD and len(gets) == 1
    assert download_dataset(url, "cifar", MD5, "the test archive", "fix: none") == path
    assert len(gets) == 1
    with open(path, "r+b") as handle:  # damaged: fetched again
        handle.truncate(1000)
    download_dataset(url, "cifar", MD5, "the test archive", "fix: none")
    assert len(gets) == 2 and open(path, "rb").read() == PAYLOAD


def test_two_runs_at_once_download_the_weights_once(slow_server, tmp_path, monkeypatch,
                                                    capsys):
    """Two downloads of one weights file at the same time (two threads stand for two runs:
    each takes the lock through its own open file): one fetches it, the other waits for it
    and reads the same file."""
    import paddle.utils.download as paddle_download

    from utils.io.download import download_weights

    url, gets = slow_server
    url = url.replace("cifar-100-python.tar.gz", "weights.pdparams")
    monkeypatch.setattr(paddle_download, "WEIGHTS_HOME", str(tmp_path / "weights"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(
        download_weights(url, "the test weights", "fix: none"))) for _ in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.3)  # the first holds the lock while it downloads
    for thread in threads:
        thread.join(timeout=HANG_S)
    assert len(gets) == 1 and len(paths) == 2 and paths[0] == paths[1]
    assert open(paths[0], "rb").read() == PAYLOAD
    assert "the test weights: waiting while another process downloads it" in capsys.readouterr().out
