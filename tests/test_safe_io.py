"""The pieces under safe loading and durable saving: restricted unpickling, safetensors
round trips, atomic writes that fail cleanly, incomplete checkpoint folders."""

import errno
import io
import os
import pickle
import shutil

import numpy as np
import pytest

from utils.checkpoint import find_last, save_last
from utils.errors import UserError
from utils.files import read_json, write_atomically, write_json
from utils.safe_pickle import safe_unpickle
from utils.tensor_io import load_tensors, pack, save_tensors, unpack

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
    with pytest.raises(UserError, match="array of Python objects"):
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
    save_last(out, {"model": {"w": np.ones(2, np.float32)}}, {"version": 1})
    shutil.copytree(os.path.join(out, "last"), os.path.join(out, "last.old"))
    os.remove(os.path.join(out, "last", "model.safetensors"))  # a folder missing a listed file
    assert find_last(out) == os.path.join(out, "last.old")
    with open(os.path.join(out, "last.old", "state.json"), "w", encoding="utf-8") as handle:
        handle.write('{"vers')
    with pytest.raises(UserError, match="is not valid JSON"):
        find_last(out)
