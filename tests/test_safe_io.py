"""utils/io/: restricted unpickling (pickled code, crafted dtypes, allocation bombs),
safetensors round trips and odd metadata, atomic writes that fail cleanly and never go
through a link, bounded reads that refuse special files, incomplete checkpoint folders."""

import builtins
import errno
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from conftest import (
    DEMO_CLI,
    FAST_CLI,
    HANG_S,
    ROOT,
    SUBSET_CLI,
    Payload,
    assert_one_error,
    cifar_batch,
    digits_cifar_archive,
    out_args,
    run_script,
    tiny_model_config,
    write_cifar_archive,
)
from photo_folders import folder_data_cfg

from data.digits import load_digits
from data.folders import label_names, list_split
from models.build import build_model
from training.config import load_config
from utils.checkpoint import find_last, save_last
from utils.errors import UserError
from utils.io.files import check_writable, open_unlinked, read_json, write_atomically, write_json
from utils.io.safe_pickle import safe_unpickle
from utils.io.tensor_io import load_tensors, pack, save_tensors, unpack

ARRAYS = [np.arange(12, dtype=np.float32).reshape(3, 4), np.arange(6.0).reshape(2, 3).T,
          np.zeros((0, 3072), np.uint8), np.int64(7), np.float32(0.5)]


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_arrays_and_containers_load_under_every_protocol(protocol):
    value = {b"data": ARRAYS, "nested": {"list": [1, 2.5, "x", b"y", None, True]}}
    loaded = safe_unpickle(io.BytesIO(pickle.dumps(value, protocol=protocol)), "test",
                           encoding="bytes")
    for want, got in zip(ARRAYS, loaded[b"data"]):
        assert np.array_equal(want, got) and np.asarray(want).dtype == np.asarray(got).dtype
    assert loaded["nested"] == value["nested"]


def test_object_arrays_and_foreign_globals_are_refused():
    objects = np.array([1, "two"], dtype=object)
    with pytest.raises(UserError, match=r"asks to call numpy.dtype\('O8'\)"):
        safe_unpickle(io.BytesIO(pickle.dumps({"w": objects})), "test")
    with pytest.raises(UserError, match="asks to call collections.Counter while loading"):
        safe_unpickle(io.BytesIO(pickle.dumps(__import__("collections").Counter("ab"))), "test")
    with pytest.raises(UserError, match="is truncated or not a pickle file"):
        safe_unpickle(io.BytesIO(pickle.dumps(ARRAYS)[:40]), "test")


def test_nested_state_round_trips_through_safetensors(tmp_path):
    state = {"@blocks.0.w_moment1_0": np.ones((2, 3), np.float32),
             "master_weights": {"@head.weight": np.full((3,), 2.0, np.float32)},
             "LR_Scheduler": {"last_epoch": 5, "last_lr": 0.00123, "LinearWarmup_LR": {"x": 1}}}
    tensors, rest = pack(state)
    assert set(tensors) == {"@blocks.0.w_moment1_0", "master_weights/@head.weight"}
    path = str(tmp_path / "opt.safetensors")
    save_tensors(path, state, {"record": {"top1": 0.5}})
    loaded, metadata = load_tensors(path)
    assert metadata == {"record": {"top1": 0.5}}
    assert loaded["LR_Scheduler"] == state["LR_Scheduler"]
    assert np.array_equal(loaded["master_weights"]["@head.weight"], [2.0, 2.0, 2.0])
    assert unpack(tensors, rest).keys() == state.keys()
    with open(path, "rb") as handle:
        assert handle.read(1) != b"\x80"  # not a pickle


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / "record.json")
    write_json(path, {"version": 1})

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        write_atomically(path, b"{}")
    monkeypatch.undo()
    assert read_json(path) == {"version": 1} and os.listdir(tmp_path) == ["record.json"]


def test_incomplete_or_damaged_checkpoints_are_not_used(tmp_path):
    out = str(tmp_path)
    save_last(out, {"raw": {"w": np.ones(2, np.float32)}}, {"version": 1}, ["0", "1"])
    shutil.copytree(os.path.join(out, "last"), os.path.join(out, "last.old"))
    os.remove(os.path.join(out, "last", "raw.safetensors"))  # a folder missing a listed file
    assert find_last(out) == os.path.join(out, "last.old")
    with open(os.path.join(out, "last.old", "state.json"), "w", encoding="utf-8") as handle:
        handle.write('{"vers')
    with pytest.raises(UserError, match="is not valid JSON"):
        find_last(out)


# NumPy's datetime dtype state with metadata None: numpy.dtype + BUILD segfaulted NumPy.
DTYPE_CRASH = (b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00M8\x89\x88\x87R(K\x03X\x01\x00\x00\x00<NNN"
               b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb.")


def _load_in_child(blobs, limit_bytes=1 << 30):
    """safe_unpickle each blob in a child process under an address-space limit; its
    one-line outcomes (a crash of the child shows as its exit code)."""
    code = ("import io, resource, sys, json; sys.path.insert(0, '.')\n"
            f"resource.setrlimit(resource.RLIMIT_AS, ({limit_bytes}, {limit_bytes}))\n"
            "from utils.io.safe_pickle import safe_unpickle\n"
            "from utils.errors import UserError\n"
            "out = []\n"
            "for path in sys.argv[1:]:\n"
            "    try:\n"
            "        safe_unpickle(open(path, 'rb'), 'f', encoding='bytes'); out.append('loaded')\n"
            "    except UserError as exc:\n"
            "        out.append(str(exc))\n"
            "print(json.dumps(out))\n")
    return subprocess.run([sys.executable, "-c", code, *blobs], cwd=ROOT, capture_output=True,
                          text=True, timeout=HANG_S)


@pytest.mark.slow
def test_crafted_dtype_states_and_allocation_bombs_are_refused_by_name(tmp_path):
    bombs = {
        "dtype crash": (DTYPE_CRASH, "asks to call numpy.dtype('M8')"),
        # numpy.ndarray((1000000, 3072), 'u1'): 3 GB of uninitialised memory from 60 bytes
        "ndarray call": (b"\x80\x02cnumpy\nndarray\nJ@B\x0f\x00M\x00\x0c\x86X\x02\x00\x00\x00u1"
                         b"\x86R.", "asks to call numpy.ndarray(...) directly"),
        # a reconstructed array declaring 3 GB over 8 bytes of data
        "short data": (pickle.dumps(np.zeros(8, np.uint8), protocol=2).replace(
            b"K\x08\x85", b"J@B\x0f\x00M\x00\x0c\x86"), "declared over 8 bytes of data"),
        "bytes(n)": (b"\x80\x02c__builtin__\nbytes\nJ\x00\x00\x00@\x85R.",
                     "asks to call bytes(1073741824,)"),
        "other codec": (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x04\x00\x00\x00zlib\x86R.",
                        "_codecs.encode(..., 'zlib')"),
        "object dtype": (pickle.dumps(np.array([1, "a"], dtype=object), protocol=2),
                         "numpy.dtype('O8')"),
        "deep nesting": (pickle.dumps(_nested(200), protocol=4), "nested more than 32 levels"),
        "bytes length 2**62": (b"\x80\x04\x8e" + (2 ** 62).to_bytes(8, "little") + b"xx.",
                               "is truncated or not a pickle file"),
    }
    paths = []
    for name, (blob, _) in bombs.items():
        paths.append(str(tmp_path / f"{len(paths)}.pkl"))
        with open(paths[-1], "wb") as handle:
            handle.write(blob)
    proc = _load_in_child(paths)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    for (name, (_, message)), got in zip(bombs.items(), json.loads(proc.stdout)):
        assert message in got and "\n" not in got, (name, got)


def _nested(depth):
    value = [1]
    for _ in range(depth):
        value = [value]
    return value


def _fuzz_seeds(tmp_path):
    images, labels = load_digits("train")
    batch = cifar_batch(images[:4], labels[:4])
    state = {"blocks.0.attn.qkv.weight": np.arange(24, dtype=np.float32).reshape(4, 6),
             "head.bias": np.zeros(3, np.float16), "step": np.int64(3),
             "StructuredToParameterName@@": {"head.bias": "linear_1.b_0"}}
    seeds = {"cifar2.pkl": pickle.dumps(batch, protocol=2),
             "state4.pkl": pickle.dumps(state, protocol=4),
             "state5.pkl": pickle.dumps(state, protocol=5),
             "scalars2.pkl": pickle.dumps([np.float32(1.5), np.bool_(True), (np.int8(-2),)],
                                          protocol=2)}
    paths = []
    for name, blob in seeds.items():
        paths.append(str(tmp_path / name))
        with open(paths[-1], "wb") as handle:
            handle.write(blob)
    return paths


@pytest.mark.slow
def test_fuzzed_pickles_load_or_fail_with_one_line_and_never_crash(tmp_path):
    paths = _fuzz_seeds(tmp_path)
    for path in paths:  # the seeds themselves load
        with open(path, "rb") as handle:
            safe_unpickle(handle, path, encoding="bytes")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "fuzz_pickle.py"), "0",
                           "4000", *paths], cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    outcome = json.loads(proc.stdout)
    assert outcome["other"] == [] and outcome["loaded"] + outcome["refused"] == 4000
    assert outcome["refused"] > 1000 and outcome["loaded"] > 100  # both paths exercised



# numpy.ndarray((1000000, 3072), 'u1'): 3 GB of uninitialised memory from 37 bytes.
NDARRAY_BOMB = (b"\x80\x02cnumpy\nndarray\nJ@B\x0f\x00M\x00\x0c\x86X\x02\x00\x00\x00u1\x86R.")


@pytest.mark.slow
def test_the_dtype_crash_file_is_refused_by_every_entry_point(tmp_path, trained):
    evil = tmp_path / "evil.pdparams"
    evil.write_bytes(DTYPE_CRASH)
    cases = [
        ("val.py", *DEMO_CLI, "--weights", str(evil)),
        ("predict.py", *DEMO_CLI, "--weights", str(evil), os.path.join(ROOT, "docs", "demo_curves.png")),
        ("export.py", *DEMO_CLI, "--weights", str(evil), "--out", str(tmp_path / "x")),
        ("main.py", *DEMO_CLI, *FAST_CLI, *out_args(tmp_path, "a"), "--init-from", str(evil)),
        ("main.py", *DEMO_CLI, "-o", "data.name=cifar100", "-o",
         f"data.path={digits_cifar_archive(tmp_path / 'c.tar.gz', train=DTYPE_CRASH)}", *out_args(tmp_path, "b")),
    ]
    for script, *args in cases:
        assert_one_error(run_script(script, *args), "asks to call numpy.dtype('M8')")


@pytest.mark.slow
def test_allocation_bombs_in_a_small_archive_are_refused(tmp_path):
    bomb = write_cifar_archive(tmp_path / "bomb.tar.gz", {"train": NDARRAY_BOMB})
    assert os.path.getsize(bomb) < 2048
    proc = run_script("main.py", *DEMO_CLI, "-o", "data.name=cifar100", "-o", f"data.path={bomb}",
                      *out_args(tmp_path))
    assert_one_error(proc, "asks to call numpy.ndarray(...) directly")
    # A member that unpacks to far more than its archive: a gzip bomb.
    zeros = tmp_path / "zeros.tar.gz"
    with tarfile.open(zeros, "w:gz") as archive:
        info = tarfile.TarInfo("cifar-100-python/train")
        info.size = 64 << 20
        archive.addfile(info, _Zeros(info.size))
    assert os.path.getsize(zeros) < (1 << 20)
    proc = run_script("main.py", *DEMO_CLI, "-o", "data.name=cifar100", "-o", f"data.path={zeros}",
                      *out_args(tmp_path, "z"))
    assert_one_error(proc, "would unpack to 67108864 bytes, far more than its archive holds")


class _Zeros:
    """A file object of ``size`` zero bytes, written without holding them."""

    def __init__(self, size):
        self.left = size

    def read(self, n=-1):
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return bytes(n)


@pytest.mark.slow
def test_more_paths_of_the_wrong_kind_are_one_line(tmp_path):
    cases = [
        (["main.py", "-c", str(tmp_path), "--dry-run"], "is a folder without config.yaml"),
        (["main.py", *DEMO_CLI, "-o", "train.output_dir=''"], "train.output_dir is empty"),
        (["val.py", *DEMO_CLI, "--weights", str(tmp_path)], "is a folder without "
                                                            "best.safetensors"),
        (["val.py", *DEMO_CLI, "--weights", "/dev/zero"], "is not a regular file"),
        (["main.py", *DEMO_CLI, *out_args(tmp_path), "--resume", "/dev/zero"],
         "no complete checkpoint to resume in /dev/zero"),
        (["predict.py", *DEMO_CLI, "--model-dir", "/dev/null",
          os.path.join(ROOT, "docs", "demo_predictions.png")], "is not a regular file"),
    ]
    for (script, *args), message in cases:
        assert_one_error(run_script(script, *args, timeout=HANG_S), message)


def test_safetensors_with_odd_metadata_are_one_line(tmp_path):
    from safetensors.numpy import save

    from utils.errors import UserError
    from utils.io.tensor_io import load_tensors

    tensors = {"a/b": np.zeros(2, np.float32)}
    for rest in ("{bad json", "[1, 2]", '{"a": 5}', '"x"'):
        path = str(tmp_path / "odd.safetensors")
        with open(path, "wb") as handle:
            handle.write(save(tensors, metadata={"rest": rest}))
        with pytest.raises(UserError, match="has damaged metadata"):
            load_tensors(path)


@pytest.fixture
def specials(tmp_path):
    """A FIFO, /dev/zero, a folder and a symbolic-link loop."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    return {"a pipe": (str(fifo), "not a regular file"),
            "a device": ("/dev/zero", "not a regular file"),
            "a folder": (str(tmp_path), "is a folder"),
            "a loop": (str(loop), "symbolic link loop")}


def test_special_files_in_path_settings_are_one_line_each(tmp_path, specials):
    from models.build import load_weights

    model = build_model(tiny_model_config())
    for path, fragment in specials.values():
        for read in (lambda: label_names(folder_data_cfg(tmp_path, label_names=path), 3),
                     lambda: list_split(folder_data_cfg(tmp_path, name="list", train_list=path),
                                        "train_list", 3),
                     lambda: load_weights(model, path),
                     lambda: load_config(path)):
            with pytest.raises(UserError, match=fragment):
                read()


@pytest.mark.slow
def test_a_special_file_given_to_the_entry_points_is_one_line(tmp_path, specials):
    fifo, _ = specials["a pipe"]
    proc = run_script("main.py", "-c", fifo, "--dry-run", timeout=HANG_S)
    assert_one_error(proc, "not a regular file")
    proc = run_script("val.py", "-c", "configs/demo.yaml", "--weights", "/dev/zero", timeout=HANG_S)
    assert_one_error(proc, "/dev/zero")


@pytest.mark.slow
def test_no_write_replaces_or_goes_through_a_link(tmp_path, victim):
    link = tmp_path / "out.json"
    link.symlink_to(victim)
    for write in (lambda: write_atomically(str(link), b"x"), lambda: write_json(str(link), {}),
                  lambda: open_unlinked(str(link), "a"), lambda: open_unlinked(str(link), "w"),
                  lambda: check_writable(str(link), "--json")):
        with pytest.raises(UserError, match="is a symbolic link"):
            write()
        assert link.is_symlink() and victim.read_text() == "keep me\n"
    # A planted temporary file is replaced, never written through.
    target = tmp_path / "best.json"
    (tmp_path / "best.json.tmp").symlink_to(victim)
    write_json(str(target), {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1} and victim.read_text() == "keep me\n"
    assert not os.path.lexists(tmp_path / "best.json.tmp")


PAYLOADS = {  # the function, its argument given a marker path, the global the pickle names
    "os.system": (os.system, lambda marker: f"touch {marker}", "posix.system"),
    "builtins.exec": (builtins.exec, lambda marker: f"open({str(marker)!r}, 'w').close()",
                      "builtins.exec"),
}


def _evil_pickle(kind, marker):
    function, argument, _ = PAYLOADS[kind]
    return pickle.dumps({"pos_embed": np.zeros((1, 2), np.float32),
                         "extra": Payload(function, argument(marker))}, protocol=4)


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_weights_pickle_with_code_is_refused_and_never_runs(tmp_path, kind):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pdparams"
    evil.write_bytes(_evil_pickle(kind, marker))
    pickle.loads(_evil_pickle(kind, tmp_path / "live"))  # the file is live: plain pickle runs it
    assert (tmp_path / "live").exists()
    forbidden = PAYLOADS[kind][2]
    proc = run_script("val.py", *DEMO_CLI, "--weights", str(evil))
    assert_one_error(proc, f"asks to call {forbidden} while loading", "refusing to load it")
    proc = run_script("main.py", *DEMO_CLI, *SUBSET_CLI, "-o", f"model.pretrained={evil}",
                      "-o", f"train.output_dir={tmp_path / 'out'}")
    assert_one_error(proc, forbidden)
    assert not marker.exists()
