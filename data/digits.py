"""The bundled demo data: scikit-learn's 1,797 handwritten digit scans as CIFAR-like images."""

import numpy as np

SIDE = 32
HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 0


def _to_rgb32(scans):
    """8×8 grey levels 0..16 → 32×32×3 uint8, bicubic upsampling through Paddle's transforms."""
    from paddle.vision.transforms import functional as F
    from PIL import Image

    grey = np.round(scans * (255.0 / 16.0)).astype(np.uint8)
    big = [np.asarray(F.resize(Image.fromarray(img), (SIDE, SIDE), interpolation="bicubic"))
           for img in grey]
    return np.ascontiguousarray(np.repeat(np.stack(big)[..., None], 3, axis=-1))


def load_digits(mode):
    """One split of the digits demo: uint8 ``[N, 32, 32, 3]`` and int64 labels ``[N]``.

    The split is stratified by class and fixed (seeded), holding out 20 %.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    index = np.arange(len(bunch.target))
    train_idx, test_idx = train_test_split(index, test_size=HELD_OUT_FRACTION,
                                           stratify=bunch.target, random_state=SPLIT_SEED)
    chosen = np.sort(train_idx if mode == "train" else test_idx)
    return _to_rgb32(bunch.images[chosen]), bunch.target[chosen].astype(np.int64)


def digits_class_names():
    """Class names of the digits demo."""
    return [str(d) for d in range(10)]
