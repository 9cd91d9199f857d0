"""Run ``python main.py ARGS`` with probes: ``python tests/stack_probe.py OUT.json ARGS``.

Records, as JSON in OUT.json, the project's frames (file and function, outermost first)
at the first step of every optimizer, and at the construction of every optimizer and loss
layer; at each first step also which earlier optimizers and stage-check models are still
alive, and how many bytes of Paddle's host allocator a garbage collection then frees,
beside the bytes of the optimizer's parameters. Python's automatic garbage collection is
off, so that only the run's own collections free what sits in a reference cycle (Paddle's
optimizers do).
"""

import gc
import json
import os
import runpy
import sys
import traceback
import weakref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import utils  # noqa: E402,F401  isort: skip  (first, as main.py: Pillow before Paddle)
import paddle  # noqa: E402
from paddle.base import core  # noqa: E402

OUT, sys.argv = sys.argv[1], ["main.py", *sys.argv[2:]]
records = {"steps": [], "built": []}
optimizers, scratch_models = [], []


def project_frames():
    """``file:function`` of each frame in the project's own code, outermost first."""
    frames = []
    for frame in traceback.extract_stack()[:-2]:
        path = os.path.abspath(frame.filename)
        if os.path.isfile(path) and path.startswith(ROOT + os.sep) \
                and not path.startswith(os.path.join(ROOT, "tests")):
            frames.append(f"{os.path.relpath(path, ROOT)}:{frame.name}")
    return frames


def parameters(optimizer):
    """The parameters an optimizer updates (Paddle keeps groups as dicts)."""
    for item in optimizer._parameter_list:
        yield from (item["params"] if isinstance(item, dict) else [item])


def probe_init(cls):
    real = cls.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        if type(self) is cls:
            records["built"].append({"what": cls.__name__, "frames": project_frames()})
            if isinstance(self, paddle.optimizer.Optimizer):
                optimizers.append(weakref.ref(self))

    cls.__init__ = init


def probe_step(cls):
    real = cls.step

    def step(self, *args, **kwargs):
        if not getattr(self, "_probed", False):
            self._probed = True
            entry = {
                "frames": project_frames(),
                "other_optimizers_alive": sum(1 for ref in optimizers
                                              if ref() is not None and ref() is not self),
                "scratch_models_alive": sum(1 for ref in scratch_models if ref() is not None),
                "parameter_bytes": sum(int(param.numel()) * param.element_size()
                                       for param in parameters(self))}
            allocated = core.host_memory_stat_current_value("Allocated", 0)
            getattr(gc, "real_collect", gc.collect)()  # the real one, where a test made it a no-op
            entry["collection_frees_bytes"] = \
                allocated - core.host_memory_stat_current_value("Allocated", 0)
            records["steps"].append(entry)
        return real(self, *args, **kwargs)

    cls.step = step


for optimizer_class in (paddle.optimizer.AdamW, paddle.optimizer.Momentum):
    probe_init(optimizer_class)
for optimizer_class in (paddle.optimizer.Optimizer, paddle.optimizer.AdamW):
    probe_step(optimizer_class)

from losses.distill import DistillationLoss  # noqa: E402
from losses.rdrop import RDropLoss  # noqa: E402
from training.stage import RunModel  # noqa: E402

for loss_class in (RDropLoss, DistillationLoss):
    probe_init(loss_class)
real_scratch = RunModel.scratch.__func__


def scratch(cls, *args, **kwargs):
    net = real_scratch(cls, *args, **kwargs)
    scratch_models.append(weakref.ref(net.model))
    return net


RunModel.scratch = classmethod(scratch)
gc.disable()
try:
    runpy.run_path(os.path.join(ROOT, "main.py"), run_name="__main__")
finally:
    with open(OUT, "w", encoding="utf-8") as handle:
        json.dump(records, handle)
