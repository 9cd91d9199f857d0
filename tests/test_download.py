"""utils/io/download.py: offline, every download a run needs is named at once, before
anything is loaded."""

import pytest

from utils.config import load_config
from utils.errors import UserError


def test_offline_every_missing_download_is_named_at_once(monkeypatch):
    import data.cifar as cifar
    import utils.io.download as download
    from data.cifar import pending_download as cifar_download
    from models.build import pending_download as weights_download

    monkeypatch.setattr(cifar, "default_archive_path", lambda c: "/nonexistent/archive.tar.gz")
    monkeypatch.setattr(download, "weights_cached", lambda url: False)
    monkeypatch.setattr(download, "_unreachable", lambda url: "Name or service not known")
    import models.build as build

    monkeypatch.setattr(build, "weights_cached", lambda url: False)
    cfg = load_config("configs/rdrop_deit_b_384_cifar100.yaml")
    needed = [cifar_download(cfg.data), weights_download(cfg.model)]
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
    from models.build import pending_download as weights_download

    proc_cfg = load_config("configs/rdrop_deit_b_384_cifar100.yaml",
                           [f"data.path={tmp_path}/gone.tar.gz"])
    from data.dataset import data_path_problems

    with pytest.raises(UserError) as caught:
        download.ensure_downloadable([weights_download(proc_cfg.model)],
                                     absent=data_path_problems(proc_cfg.data))
    message = str(caught.value)
    assert "1 download(s) cannot be made" in message
    assert f"data.path {tmp_path}/gone.tar.gz does not exist" in message
