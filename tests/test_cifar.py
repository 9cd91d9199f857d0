"""data/cifar.py: the CIFAR-10/100 reader against Paddle's own datasets, and archives a
careless or malicious user hands it (links, odd members, pickled code, damaged files)."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    DEMO_CLI,
    FAST_CLI,
    HANG_S,
    ROOT,
    Payload,
    assert_one_error,
    cifar_batch,
    digits_cifar_archive,
    out_args,
    run_script,
    write_cifar_archive,
)

from data import cifar
from data.cifar import CIFAR10, CIFAR100, cifar_class_names, load_cifar, locate_cifar
from data.digits import load_digits
from data.formats import FORMATS
from utils.errors import UserError


@pytest.mark.slow
def test_links_in_a_cifar_archive_are_not_followed(tmp_path):
    path = tmp_path / "links.tar.gz"
    digits_cifar_archive(path)
    with tarfile.open(path) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive if m.isfile()]
    with tarfile.open(path, "w:gz") as archive:
        for member, data in members:
            if not member.name.endswith("train"):
                archive.addfile(member, __import__("io").BytesIO(data))
        link = tarfile.TarInfo("cifar-100-python/train")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    proc = run_script("main.py", *DEMO_CLI, "-o", "data.name=cifar100", "-o", f"data.path={path}",
                      *out_args(tmp_path))
    assert_one_error(proc, "no 'train' split found")


@pytest.mark.slow
def test_the_cifar_reader_opens_only_its_regular_members(tmp_path):
    archive = digits_cifar_archive(tmp_path / "a.tar.gz")
    folder = tmp_path / "extracted"
    with tarfile.open(archive) as handle:
        handle.extractall(folder, filter="data")
    os.mkfifo(folder / "cifar-100-python" / "file.txt~")  # every file was opened: a hang
    proc = run_script("main.py", *DEMO_CLI, *FAST_CLI, "-o", "data.name=cifar100", "-o",
                      "model.num_classes=100", "-o", f"data.path={folder}", "-o",
                      "data.val_split=0", *out_args(tmp_path), timeout=HANG_S)  # 160 train images
    assert proc.returncode == 0, proc.stderr[-2000:]
    os.remove(folder / "cifar-100-python" / "test")
    os.mkfifo(folder / "cifar-100-python" / "test")
    proc = run_script("main.py", *DEMO_CLI, "-o", "data.name=cifar100", "-o",
                      f"data.path={folder}", *out_args(tmp_path, "b"), timeout=HANG_S)
    assert_one_error(proc, "cifar-100-python/test is not a regular file")
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    for path, words in (("/dev/zero", "is not a regular file (a device, pipe or socket)"),
                        (str(loop), "is a symbolic link loop")):
        proc = run_script("main.py", *DEMO_CLI, "-o", "data.name=cifar100", "-o",
                          f"data.path={path}", *out_args(tmp_path, "c"), timeout=HANG_S)
        assert_one_error(proc, f"data.path {path} {words}")


@pytest.mark.slow
@pytest.mark.parametrize("member,words", [
    ("test", {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": ["a", "b"]}),
    ("test", {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0.5, 1.0]}),
    ("test", {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [None, 2 ** 80]}),
    ("test", {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [[1], [2]]}),
    ("meta", {b"fine_label_names": [1, 2, 3]}),
    ("meta", {b"fine_label_names": b"abc"}),
])
def test_cifar_labels_and_meta_of_odd_types_are_one_line(tmp_path, member, words):
    archive = digits_cifar_archive(tmp_path / "a.tar.gz", **{member: words})
    proc = run_script("main.py", *DEMO_CLI, *FAST_CLI, "-o", "data.name=cifar100", "-o",
                      "model.num_classes=100", "-o", f"data.path={archive}", *out_args(tmp_path))
    assert_one_error(proc, "labels that are not a list of integers" if member == "test"
                     else "has no fine_label_names list")


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
    return run_script("main.py", *DEMO_CLI, "-o", "data.name=cifar100", "-o", f"data.path={archive}",
                      "-o", f"train.output_dir={tmp_path / 'out'}", *extra)


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("row", sorted(DATA_ROWS))
def test_bad_data_is_one_error_line(tmp_path, row):
    make, *fragments = DATA_ROWS[row]
    assert_one_error(_train_on(make(tmp_path), tmp_path), *fragments)


FINE_NAMES = [f"class_{i}" for i in range(100)]


C100, C10 = CIFAR100, CIFAR10


def _real_digit_images(mode):
    """Real digit scans with three different channels, so a channel mix-up shows."""
    images, labels = load_digits(mode)
    grey = images[..., 0]
    rgb = np.stack([grey, 255 - grey, grey[:, :, ::-1]], axis=-1)
    return np.ascontiguousarray(rgb), labels * 7 + 3  # spread labels over 100 classes


def _assert_same_samples(images, labels, reference):
    """Our arrays hold exactly the bytes and labels of Paddle's dataset, in its order."""
    assert images.dtype == np.uint8 and images.shape == (len(reference), 32, 32, 3)
    assert labels.dtype == np.int64 and labels.shape == (len(reference),)
    for index in range(len(reference)):
        image, label = reference[index]
        assert np.asarray(image).tobytes() == images[index].tobytes()
        assert int(label) == labels[index]


@pytest.fixture(scope="module")
def cifar_archive(tmp_path_factory):
    """A cifar-100-python.tar.gz written from real digit images."""
    path = tmp_path_factory.mktemp("cifar") / C100.archive
    members = {"train": cifar_batch(*_real_digit_images("train")),
               "test": cifar_batch(*_real_digit_images("test")),
               "meta": {b"fine_label_names": [n.encode() for n in FINE_NAMES],
                        b"coarse_label_names": [b"c"] * 20}}
    return write_cifar_archive(path, members)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["train", "test"])
def test_reader_is_byte_identical_to_paddle_cifar100(cifar_archive, mode):
    from paddle.vision.datasets import Cifar100

    images, labels = load_cifar(C100, cifar_archive, mode)
    _assert_same_samples(images, labels, Cifar100(data_file=cifar_archive, mode=mode,
                                                  download=False, backend="pil"))
    expected, expected_labels = _real_digit_images(mode)
    assert np.array_equal(images, expected) and np.array_equal(labels, expected_labels)


def test_reader_reads_an_extracted_folder_the_same(cifar_archive, tmp_path):
    with tarfile.open(cifar_archive) as archive:
        archive.extractall(tmp_path, filter="data")
    for folder in (tmp_path, tmp_path / "cifar-100-python"):
        images, labels = load_cifar(C100, str(folder), "test")
        ref_images, ref_labels = load_cifar(C100, cifar_archive, "test")
        assert np.array_equal(images, ref_images) and np.array_equal(labels, ref_labels)
    assert cifar_class_names(C100, str(tmp_path)) == FINE_NAMES
    assert cifar_class_names(C100, cifar_archive) == FINE_NAMES


@pytest.fixture(scope="module")
def cifar10_archive(tmp_path_factory):
    """A cifar-10-python.tar.gz written from real digit images: five training batches, stored
    out of order, with CIFAR-10's label key, and the test batch."""
    images, labels = load_digits("train")
    chunks = np.array_split(np.arange(len(labels)), 5)
    members = {}
    for number in (3, 1, 5, 2, 4):
        batch = cifar_batch(images[chunks[number - 1]], labels[chunks[number - 1]])
        batch[b"labels"] = batch.pop(b"fine_labels")
        del batch[b"coarse_labels"]
        members[f"data_batch_{number}"] = batch
    test = cifar_batch(*load_digits("test"))
    test[b"labels"] = test.pop(b"fine_labels")
    members.update({"test_batch": test, "readme.html": b"<html></html>",
                    "batches.meta": {b"label_names": [f"digit {i}".encode() for i in range(10)],
                                     b"num_vis": 3072}})
    path = tmp_path_factory.mktemp("cifar10") / C10.archive
    return write_cifar_archive(path, members, folder=C10.folder)


@pytest.mark.parametrize("mode", ["train", "test"])
def test_cifar10_reader_is_byte_identical_to_paddle_cifar10(cifar10_archive, mode, tmp_path):
    from paddle.vision.datasets import Cifar10

    images, labels = load_cifar(C10, cifar10_archive, mode)
    _assert_same_samples(images, labels, Cifar10(data_file=cifar10_archive, mode=mode,
                                                 download=False, backend="pil"))
    expected, expected_labels = load_digits(mode)
    assert np.array_equal(images, expected) and np.array_equal(labels, expected_labels)
    with tarfile.open(cifar10_archive) as archive:
        archive.extractall(tmp_path, filter="data")
    folder_images, folder_labels = load_cifar(C10, str(tmp_path), mode)
    assert np.array_equal(folder_images, images) and np.array_equal(folder_labels, labels)


def test_cifar10_is_a_data_name_with_its_class_names(cifar10_archive):
    from data.dataset import class_names, run_splits
    from training.config import load_config

    cfg = load_config("configs/demo.yaml", ["data.name=cifar10", f"data.path={cifar10_archive}",
                                            "data.val_split=100"])
    train, val, test, names = run_splits(cfg.data, 10, 0)
    assert (len(train.labels), len(val.labels), len(test.labels)) == (1337, 100, 360)
    assert names == [f"digit {i}" for i in range(10)]
    assert class_names(cfg.data, 10) == [f"digit {i}" for i in range(10)]
    with pytest.raises(UserError, match="is it the cifar-10-python.tar.gz archive"):
        load_cifar(C10, write_cifar_archive(
            str(Path(cifar10_archive).parent / "other.tar.gz"), {"train": {}}), "train")


def test_missing_archive_offline_names_file_and_option(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "default_archive_path", lambda c: str(tmp_path / c.archive))

    def unreachable(*args, **kwargs):
        raise OSError(-2, "Name or service not known")

    monkeypatch.setattr("utils.io.download.socket.create_connection", unreachable)
    with pytest.raises(UserError) as info:
        locate_cifar(C100, None)
    message = str(info.value)
    assert str(tmp_path / C100.archive) in message
    assert "-o data.path=" in message and "Name or service not known" in message
    with pytest.raises(UserError, match="data.path /nope does not exist"):
        locate_cifar(C100, "/nope")


def test_an_archive_mounted_by_ai_studio_is_used_when_data_path_is_unset(tmp_path, monkeypatch,
                                                                       capsys):
    """The public CIFAR-100 dataset added to an AI Studio project: found under
    /home/aistudio/data/dataNNNN/ and named in a line; nothing to download then."""
    from data import cifar
    from training.config import load_config

    monkeypatch.setattr(cifar, "AISTUDIO_DATA", str(tmp_path))
    archive = tmp_path / "data12345" / "cifar-100-python.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(b"an archive")
    cfg = load_config("configs/rdrop_deit_b_384_cifar100.yaml")
    assert cfg.data.path is None
    assert cifar.locate_cifar(cifar.CIFAR100) == str(archive)
    assert f"AI Studio dataset mounted at {archive}" in capsys.readouterr().out
    assert FORMATS["cifar100"].download(cfg.data) is None
    given = tmp_path / "mine.tar.gz"
    given.write_bytes(b"another")
    assert cifar.locate_cifar(cifar.CIFAR100, str(given)) == str(given)  # it wins


@pytest.mark.slow
def test_the_mounted_archive_a_run_read_decides_whether_it_is_complete(tmp_path):
    """data.path unset, the archive found in AI Studio's mount: the run records the archive
    it read, so the same command after the mounted archive was replaced is not "complete"
    with the old test numbers; the unchanged archive is."""
    mount = tmp_path / "mount"
    archive = mount / "data123" / C100.archive
    archive.parent.mkdir(parents=True)
    digits_cifar_archive(archive)
    args = [*DEMO_CLI, *FAST_CLI, "-o", "data.name=cifar100", "-o", "model.num_classes=100",
            "-o", "data.val_split=0", "-o", "train.progress=off", *out_args(tmp_path)]
    env = {"AISTUDIO_DATA": str(mount)}
    first = run_script("main.py", *args, env=env, timeout=HANG_S)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count(f"AI Studio dataset mounted at {archive}") == 1  # both splits
    again = run_script("main.py", *args, env=env, timeout=HANG_S)
    assert again.returncode == 0 and "is complete with this config" in again.stdout
    images, labels = load_digits("train")
    digits_cifar_archive(archive, test=cifar_batch(images[300:360], labels[300:360]))
    assert_one_error(run_script("main.py", *args, env=env, timeout=HANG_S),
                     f"finished on other data than {archive} holds now", "--overwrite")


def test_an_unreadable_mounted_archive_is_skipped_for_the_readable_one_beside_it(
        tmp_path, monkeypatch, capsys):
    """Two mounted datasets, the first archive unreadable: the second one is read, and the
    first is named with why it was skipped."""
    monkeypatch.setattr(cifar, "AISTUDIO_DATA", str(tmp_path))
    first, second = (tmp_path / name / C100.archive for name in ("data1", "data2"))
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(b"an archive")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: path != str(first) and
                        real_access(path, mode))  # root reads everything: denied here
    assert locate_cifar(C100, None) == str(second)
    out = capsys.readouterr().out
    assert f"data: skipped {first} cannot be read (permission denied)" in out
    assert f"mounted at {second}" in out


@pytest.mark.parametrize("error,words", [
    (PermissionError(13, "Permission denied"), "cannot be read (permission denied)"),
    (IsADirectoryError(21, "Is a directory"), "is a folder, not a file"),
    (OSError(28, "No space left on device"), "no space left on the device"),
    (OSError(5, "Input/output error"), "input/output error"),
])
def test_os_errors_on_an_archive_are_said_as_what_they_are(tmp_path, monkeypatch, error, words):
    """Permission denied, a folder, a full disk, a failing disk: each said as such, none as
    "damaged or truncated: download again"; a bad gzip stream is damage."""
    path = digits_cifar_archive(tmp_path / "a.tar.gz")
    error.filename = str(path)

    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(tarfile, "open", failing)
    with pytest.raises(UserError) as caught:
        load_cifar(C100, str(path), "train")
    assert str(caught.value).startswith(f"{path} ") and words in str(caught.value)
    assert "damaged" not in str(caught.value)
    monkeypatch.undo()
    Path(path).write_bytes(b"\x1f\x8b" + b"\x00" * 64)  # a gzip header, then nothing valid
    with pytest.raises(UserError, match="damaged or truncated"):
        load_cifar(C100, str(path), "train")


@pytest.mark.slow
def test_the_suite_reads_no_mount_home_or_cache_of_the_machine():
    """Every root the code reads from the machine (AI Studio's mount, HOME and the caches
    under it) lies in this session's own folder, in this process and in the scripts the tests
    start: an archive mounted under /home/aistudio/data, or cached, changes no test."""
    from paddle.dataset.common import DATA_HOME
    from paddle.utils.download import WEIGHTS_HOME

    own = os.environ["RDROP_TESTS_HOME"]
    for root in (cifar.AISTUDIO_DATA, DATA_HOME, WEIGHTS_HOME, os.path.expanduser("~")):
        assert root.startswith(own + os.sep) or root == own, root
    proc = subprocess.run([sys.executable, "-c", "import paddle.dataset.common as c; from data "
                           "import cifar; print(cifar.AISTUDIO_DATA, c.DATA_HOME)"], cwd=ROOT,
                          capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0 and all(root.startswith(own) for root in proc.stdout.split()), proc.stdout
