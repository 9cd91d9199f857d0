"""Mutated pickles against the restricted unpickler: ``python tests/fuzz_pickle.py SEED COUNT
FILE...`` loads COUNT seeded mutations of the given valid pickles and prints one JSON line:
how many loaded, how many were refused with a one-line error, and any other outcome.

Run as its own process by the tests, so that a crash of the interpreter shows as one.
"""

import io
import json
import os
import pickletools
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.errors import UserError  # noqa: E402
from utils.io.safe_pickle import safe_unpickle  # noqa: E402

OPCODES = [op.code.encode("latin-1") for op in pickletools.opcodes]


def mutate(data, rng):
    """One to three random edits: flip, insert, delete, duplicate, truncate, swap an opcode,
    or rewrite a length field."""
    data = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        kind, at = int(rng.integers(7)), int(rng.integers(len(data)))
        if kind == 0:
            data[at] ^= 1 << int(rng.integers(8))
        elif kind == 1:
            data[at:at] = rng.bytes(int(rng.integers(1, 9)))
        elif kind == 2:
            del data[at:at + int(rng.integers(1, 17))]
        elif kind == 3:
            end = min(len(data), at + int(rng.integers(1, 33)))
            data[end:end] = data[at:end]
        elif kind == 4:
            del data[at:]
        elif kind == 5:
            data[at:at + 1] = OPCODES[int(rng.integers(len(OPCODES)))]
        else:
            data[at:at + 4] = int(rng.integers(0, 2 ** 32)).to_bytes(4, "little")
        if not data:
            data = bytearray(b".")
    return bytes(data)


def main():
    seed, count, paths = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    seeds = [open(path, "rb").read() for path in paths]
    rng = np.random.default_rng(seed)
    outcome = {"loaded": 0, "refused": 0, "other": []}
    start = time.perf_counter()
    for index in range(count):
        data = mutate(seeds[index % len(seeds)], rng)
        try:
            safe_unpickle(io.BytesIO(data), "fuzzed", encoding="bytes")
            outcome["loaded"] += 1
        except UserError as exc:
            if "\n" in str(exc):
                outcome["other"].append(f"{index}: multi-line error")
            outcome["refused"] += 1
        except BaseException as exc:  # noqa: BLE001 - anything else is a finding
            outcome["other"].append(f"{index}: {type(exc).__name__}: {exc}"[:300])
    outcome["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(outcome))


if __name__ == "__main__":
    main()
