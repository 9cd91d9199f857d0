"""A run's output folder: held by one run at a time, never taken over without being asked.

A run locks ``train.output_dir/run.lock`` with ``flock`` for as long as it lives; the lock
dies with the process (even on ``kill -9``), so a crashed run never leaves its folder
locked. A second run into a held folder stops at once, naming the holder. A fresh run
(not ``--resume``) starts only in an empty or new folder: one that holds an earlier run,
or anything else, is moved aside with ``--overwrite``, never deleted or mixed in.
"""

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from typing import Optional, Sequence

from utils.errors import UserError
from utils.io.files import ensure_folder, json_text, path_problem, read_json, refuse_link

LOCK = "run.lock"
# The lock files this process holds open. A forked child (a loader worker) closes its copies:
# the lock belongs to the open file, so a worker outliving an interrupted run would otherwise
# keep the folder locked against that same process resuming it (a notebook's next cell).
_HELD = set()


def _close_held_locks():
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_locks)
RESUME_FILE = "RESUME.txt"  # the command that continues the run, for a lost terminal
# val.py's results and charts: one per split, so that evaluating one never replaces the other's.
RESULT_FILES = {"test": "val_metrics.json", "val": "val_metrics_val.json"}
CHART_FILES = {"test": "per_class_top1.png", "val": "per_class_top1_val.png"}
# What runs and the tools around them write into an output folder: only such a folder is
# moved aside by --overwrite (a typo must not move a home folder).
RUN_ENTRIES = {LOCK, RESUME_FILE, "config.yaml", "metrics.jsonl", "last", "last.old", "last.partial",
               "best.safetensors", "best.json", "vdl", "vdl.partial", "curves.png",
               *RESULT_FILES.values(), *CHART_FILES.values(), "inference"}


def _describe(folder):
    """What an occupied output folder holds, in words."""
    try:
        state = read_json(os.path.join(folder, "last", "state.json"))
    except UserError:
        state = None
    if isinstance(state, dict) and isinstance(state.get("position"), dict):
        position, config = state["position"], state.get("config")
        stages = config.get("stages") if isinstance(config, dict) else None
        if isinstance(stages, list) and position.get("stage") == len(stages):
            if not state.get("tested"):
                return (f"a run that trained every stage ({state.get('epoch_index', '?')} "
                        f"epochs) but was stopped before its final test")
            return f"a finished run ({state.get('epoch_index', '?')} epochs)"
        return f"an unfinished run (next: {_position(position)})"
    metrics = os.path.join(folder, "metrics.jsonl")
    if os.path.isfile(metrics):
        with open(metrics, "rb") as handle:
            return f"a run's records ({sum(1 for line in handle if line.strip())} epochs)"
    entries = sorted(name for name in os.listdir(folder) if name != LOCK)
    return f"{len(entries)} other entries (e.g. {', '.join(entries[:3])})"


def _position(position):
    """Where a checkpoint stands as a resume reports it: epochs counted from 1."""
    words = {"stage": ("stage", 0), "epoch": ("epoch", 1), "micro": ("micro-batch", 0)}
    return ", ".join(f"{words[key][0]} {position[key] + words[key][1]}"
                     for key in ("stage", "epoch", "micro")
                     if isinstance(position.get(key), int))


def _aside(folder):
    """A new name beside ``folder`` for the run it holds."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, count = f"{folder.rstrip(os.sep)}.old-{stamp}", 1
    while os.path.lexists(candidate):
        count += 1
        candidate = f"{folder.rstrip(os.sep)}.old-{stamp}-{count}"
    return candidate


def _refuse_moving_inputs(folder, inputs):
    """One error when ``--overwrite`` would move ``folder`` aside with this command's current
    folder, or with a file the run still reads (``inputs``), inside it."""
    inside = os.path.realpath(folder) + os.sep
    if (os.path.realpath(os.getcwd()) + os.sep).startswith(inside):
        raise UserError(f"train.output_dir {folder} holds the current folder, which --overwrite "
                        f"would move aside: run the command from another folder (cd ..)")
    for key, path in inputs:
        if (os.path.realpath(path) + os.sep).startswith(inside):
            raise UserError(f"{key} {path} lies in train.output_dir {folder}, which --overwrite "
                            f"moves aside before the run reads it: copy it out of the folder "
                            f"and name the copy, or choose another train.output_dir")


def fresh_start_problem(path: str) -> Optional[str]:
    """Why a fresh run (neither ``--resume`` nor ``--overwrite``) cannot start in ``path``,
    in words with the ways out; ``None`` when it can (a new or empty folder)."""
    if not os.path.isdir(path) or not any(name != LOCK for name in os.listdir(path)):
        return None
    held = _describe(path)
    fix = ("" if held.startswith("a finished run") else
           "finish it with --resume (it runs the final test), " if "final test" in held
           else "continue it with --resume, ")
    return (f"train.output_dir {path} already holds {held}; {fix}choose another "
            f"train.output_dir, or pass --overwrite to move it aside and start afresh")


class RunFolder:
    """Hold ``path`` for one run: create it, lock it, and check what a fresh run finds there."""

    def __init__(self, path: str) -> None:
        self.path, self._fd, self._made = path, None, []

    def hold(self, resume: bool = False, overwrite: bool = False,
             inputs: Sequence[tuple[str, str]] = ()) -> Optional[str]:
        """Take the folder: one :class:`UserError` line if another run holds it, or if a
        fresh run would land among an earlier run's files (``overwrite`` moves them aside
        and says where, unless it holds this command's current folder or one of the
        ``inputs``, ``(setting, path)`` of what the run reads). Returns the folder the old
        run was moved to, if any."""
        if overwrite and os.path.isdir(self.path):
            _refuse_moving_inputs(self.path, inputs)
        self._made = [path for path in (os.path.join(self.path, LOCK), self.path)
                      if not os.path.lexists(path)]
        ensure_folder(self.path, "train.output_dir")
        self._lock()
        if resume or not any(name != LOCK for name in os.listdir(self.path)):
            return None
        foreign = sorted(name for name in os.listdir(self.path)
                         if name not in RUN_ENTRIES and not name.endswith(".tmp"))
        if not overwrite:
            raise UserError(fresh_start_problem(self.path))
        if foreign:
            raise UserError(f"train.output_dir {self.path} holds files that no run wrote (e.g. "
                            f"{', '.join(foreign[:3])}); --overwrite moves only earlier runs: "
                            f"choose another train.output_dir")
        if os.path.islink(self.path.rstrip(os.sep)):
            raise UserError(f"train.output_dir {self.path} is a symbolic link, which "
                            f"--overwrite would replace by a folder; move the earlier run "
                            f"aside yourself, or name the folder it points to")
        moved = _aside(self.path)
        try:
            os.replace(self.path, moved)
        except OSError as exc:
            raise UserError(f"--overwrite could not move {self.path} aside to {moved} "
                            f"({exc.strerror}); move the earlier run yourself, or choose "
                            f"another train.output_dir") from None
        self.release()
        os.makedirs(self.path)
        self._made = [os.path.join(self.path, LOCK), self.path]
        self._lock()
        print(f"moved the earlier contents of {self.path} to {moved}", flush=True)
        return moved

    def _lock(self):
        refuse_link(os.path.join(self.path, LOCK))
        fd = os.open(os.path.join(self.path, LOCK),
                     os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip()
            os.close(fd)
            try:
                about = json.loads(holder)
                who = f"pid {about['pid']} on {about['host']}, since {about['since']}"
            except (ValueError, TypeError, KeyError):
                who = "another process"
            raise UserError(f"train.output_dir {self.path} is in use by another run ({who}); "
                            f"wait for it to end or choose another train.output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, (json_text({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "command": " ".join(sys.argv)}) + "\n").encode("utf-8"))
        self._fd = fd
        _HELD.add(fd)

    def release(self) -> None:
        """Let another run take the folder (also happens when the process ends). A run
        that wrote nothing (refused at its start) leaves no trace: the lock file and the
        folder it made are removed."""
        if self._fd is None:
            return
        made, self._made = self._made, []
        try:  # while the lock is held: no other run has the folder
            unused = made and os.listdir(self.path) == [LOCK]
            if unused and os.path.join(self.path, LOCK) in made:
                os.unlink(os.path.join(self.path, LOCK))
        except OSError:  # gone meanwhile: nothing to tidy
            unused = False
        _HELD.discard(self._fd)
        os.close(self._fd)
        self._fd = None
        if unused and self.path in made:
            with contextlib.suppress(OSError):  # another run's lock may be there by now
                os.rmdir(self.path)


def folder_in_use(path: str) -> bool:
    """Whether a run holds ``path`` now (its ``run.lock`` is locked by a live process)."""
    lock = os.path.join(path, LOCK)
    if path_problem(lock):
        return False
    fd = os.open(lock, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock taken here
    return False
