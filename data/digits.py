"""The bundled demo data: scikit-learn's 1,797 handwritten digit scans as CIFAR-like images.

Preparing a split imports scikit-learn (about 1.5 s) and upsamples every scan, so the result
is kept in Paddle's dataset cache, under a name made from what produced it (the scans' file,
the scikit-learn and Pillow versions, the split's settings): a later run reads it back in
milliseconds, and any change to its sources makes a new one.
"""

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import io
import os
import tempfile
import zipfile

import numpy as np

SIDE = 32
HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 0
CLASSES = 10
# Far above a cached split (the training images are 1,437 x 3,072 bytes, 4.4 MB).
MAX_CACHED_BYTES = 16 << 20
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "paddle", "dataset", "digits")


def _to_rgb32(scans):
    """8×8 grey levels 0..16 → 32×32×3 uint8, bicubic upsampling through Paddle's transforms."""
    from paddle.vision.transforms import functional as F
    from PIL import Image

    grey = np.round(scans * (255.0 / 16.0)).astype(np.uint8)
    big = [np.asarray(F.resize(Image.fromarray(img), (SIDE, SIDE), interpolation="bicubic"))
           for img in grey]
    return np.ascontiguousarray(np.repeat(np.stack(big)[..., None], 3, axis=-1))


def _prepare(mode):
    """The split ``mode`` computed from scikit-learn's scans."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    index = np.arange(len(bunch.target))
    train_idx, test_idx = train_test_split(index, test_size=HELD_OUT_FRACTION,
                                           stratify=bunch.target, random_state=SPLIT_SEED)
    chosen = np.sort(train_idx if mode == "train" else test_idx)
    return _to_rgb32(bunch.images[chosen]), bunch.target[chosen].astype(np.int64)


def cache_path(mode: str) -> str:
    """Where the prepared split ``mode`` is kept: named by a hash of what produced it."""
    package = importlib.util.find_spec("sklearn").submodule_search_locations[0]
    with open(os.path.join(package, "datasets", "data", "digits.csv.gz"), "rb") as handle:
        scans = handle.read()
    sources = [scans, importlib.metadata.version("scikit-learn").encode(),
               importlib.metadata.version("Pillow").encode(),
               f"{mode} {SIDE} {HELD_OUT_FRACTION} {SPLIT_SEED}".encode()]
    key = hashlib.sha256(b"\0".join(sources)).hexdigest()[:16]
    return os.path.join(CACHE_DIR, f"{mode}-{key}.npz")


def _read_cached(path):
    """The cached split at ``path``, or ``None`` when it is missing or not what this module
    writes (arrays only: a pickle inside is never loaded); a damaged one is said in a line
    (the split is then prepared and cached again)."""
    if not os.path.isfile(path):  # missing, or a pipe or device planted there
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            # What each array declares, before it is read: no member may unpack to more
            # than a whole split of the digits.
            if sorted(stored.files) != ["images", "labels"] or any(
                    _declared_bytes(stored.zip, name) > MAX_CACHED_BYTES
                    for name in stored.files):
                raise ValueError("unexpected arrays")
            images, labels = stored["images"], stored["labels"]
        if (images.dtype != np.uint8 or images.shape[1:] != (SIDE, SIDE, 3)
                or labels.dtype != np.int64 or labels.shape != images.shape[:1]
                or not np.all((labels >= 0) & (labels < CLASSES))):
            raise ValueError("unexpected contents")
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        print(f"warning: the digits cache {path} is damaged ({exc}); preparing the split "
              f"again", flush=True)
        return None
    return images, labels


def _declared_bytes(archive, name):
    """The bytes the ``.npy`` member ``name`` of ``archive`` declares in its header (its
    unpacked size on disk says nothing of an array that claims more)."""
    with archive.open(f"{name}.npy") as member:
        version = np.lib.format.read_magic(member)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(member)
    return int(np.prod(shape, dtype=object)) * dtype.itemsize


def _write_cached(path, images, labels):
    """Keep the split at ``path`` (a unique temporary file renamed into place, so that runs
    writing it at once leave a whole file); a cache that cannot be written is skipped."""
    buffer = io.BytesIO()
    np.savez(buffer, images=images, labels=labels)
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o644)
            handle.write(buffer.getvalue())
        os.replace(tmp, path)
    except OSError:  # a full disk, a read-only cache: the next run prepares the split again
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)


def load_digits(mode: str) -> tuple[np.ndarray, np.ndarray]:
    """One split of the digits demo: uint8 ``[N, 32, 32, 3]`` and int64 labels ``[N]``.

    The split is stratified by class and fixed (seeded), holding out 20 %.
    """
    path = cache_path(mode)
    cached = _read_cached(path)
    if cached is not None:
        return cached
    images, labels = _prepare(mode)
    _write_cached(path, images, labels)
    return images, labels


def digits_class_names() -> list[str]:
    """Class names of the digits demo."""
    return [str(d) for d in range(CLASSES)]
