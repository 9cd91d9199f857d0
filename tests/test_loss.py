"""The R-Drop loss against an independent float64 NumPy computation."""

import numpy as np
import paddle
import pytest

from losses import CrossEntropyLoss, RDropLoss
from losses.rdrop import log_softmax


def _np_log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _np_rdrop(logits, labels, alpha, reduction):
    lp = _np_log_softmax(logits)
    b = len(labels)
    lp1, lp2 = lp[:b], lp[b:]
    ce = 0.5 * (-lp1[np.arange(b), labels].mean() - lp2[np.arange(b), labels].mean())
    kl12 = (np.exp(lp1) * (lp1 - lp2)).sum()
    kl21 = (np.exp(lp2) * (lp2 - lp1)).sum()
    kl = 0.5 * (kl12 + kl21)
    if reduction == "batchmean":
        kl /= b
    return ce + alpha * kl, ce, kl


def _logits(scale, batch=6, classes=7, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-scale, scale, size=(2 * batch, classes)).astype(np.float32)


@pytest.mark.parametrize("scale", [0.1, 3.0, 50.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
@pytest.mark.parametrize("alpha", [0.0, 5.0])
def test_matches_float64_numpy(scale, reduction, alpha):
    logits = _logits(scale)
    labels = np.arange(6) % 7
    parts = RDropLoss(alpha=alpha, kl_reduction=reduction)(paddle.to_tensor(logits),
                                                            paddle.to_tensor(labels))
    loss, ce, kl = _np_rdrop(logits, labels, alpha, reduction)
    assert set(parts) == {"loss", "ce", "kl"}
    assert float(parts["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(parts["kl"]) == pytest.approx(kl, rel=1e-4, abs=1e-6)
    assert float(parts["loss"]) == pytest.approx(loss, rel=1e-4)


def test_extreme_logits_are_exact_where_paddle_log_softmax_clamps():
    logits = np.array([[50.0, -50.0, 0.0], [-50.0, 50.0, 49.0]], dtype=np.float32)
    ours = log_softmax(paddle.to_tensor(logits)).numpy()
    assert np.allclose(ours, _np_log_softmax(logits), rtol=1e-6, atol=1e-5)
    assert ours[0, 1] == pytest.approx(-100.0)  # Paddle's CPU log_softmax returns -64 here


def test_label_shapes_b_and_b1_agree_and_identical_copies_have_zero_kl():
    half = _logits(4.0)[:6]
    logits = paddle.to_tensor(np.concatenate([half, half]))
    labels = np.array([0, 1, 2, 3, 4, 5])
    loss_fn = RDropLoss()
    a = loss_fn(logits, paddle.to_tensor(labels))
    b = loss_fn(logits, paddle.to_tensor(labels.reshape(-1, 1)))
    assert float(a["loss"]) == pytest.approx(float(b["loss"]))
    assert float(a["kl"]) == pytest.approx(0.0, abs=1e-7)


def test_kl_is_symmetric_in_the_two_copies():
    logits = _logits(5.0)
    swapped = np.concatenate([logits[6:], logits[:6]])
    labels = paddle.to_tensor(np.zeros(6, dtype=np.int64))
    first = RDropLoss()(paddle.to_tensor(logits), labels)
    second = RDropLoss()(paddle.to_tensor(swapped), labels)
    assert float(first["kl"]) == pytest.approx(float(second["kl"]), rel=1e-6)


def test_gradients_flow_and_match_finite_differences():
    logits = paddle.to_tensor(_logits(2.0, batch=2, classes=3), stop_gradient=False)
    labels = paddle.to_tensor(np.array([0, 2]))
    RDropLoss(alpha=5.0)(logits, labels)["loss"].backward()
    grad = logits.grad.numpy()
    base = logits.numpy().astype(np.float64)
    eps = 1e-4
    for i, j in [(0, 0), (3, 2)]:
        up, down = base.copy(), base.copy()
        up[i, j] += eps
        down[i, j] -= eps
        numeric = (_np_rdrop(up, np.array([0, 2]), 5.0, "batchmean")[0]
                   - _np_rdrop(down, np.array([0, 2]), 5.0, "batchmean")[0]) / (2 * eps)
        assert grad[i, j] == pytest.approx(numeric, rel=1e-3, abs=1e-5)


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match=r"expected logits of \[2B, C\]"):
        RDropLoss()(paddle.to_tensor(_logits(1.0)[:6]), paddle.to_tensor(np.zeros(6, dtype=np.int64)))


def test_plain_cross_entropy_baseline():
    logits = _logits(50.0)[:6]
    labels = np.arange(6) % 7
    parts = CrossEntropyLoss()(paddle.to_tensor(logits), paddle.to_tensor(labels))
    expected = -_np_log_softmax(logits)[np.arange(6), labels].mean()
    assert float(parts["loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(parts["kl"]) == 0.0 and CrossEntropyLoss.copies == 1 and RDropLoss.copies == 2


def _np_vit_src(logits, labels, alpha):
    """The R-Drop authors' ViT objective (vit_src/models/modeling.py), written from it in
    float64: CrossEntropyLoss() (a batch mean) of each copy, summed, plus alpha times
    kl_div(log p, q, reduction='none').sum() + kl_div(log q, p, reduction='none').sum(),
    where kl_div(input, target) = target * (log target - input)."""
    b = len(labels)
    lp, lq = _np_log_softmax(logits[:b]), _np_log_softmax(logits[b:])
    p, q = np.exp(lp), np.exp(lq)
    loss = -lp[np.arange(b), labels].mean() - lq[np.arange(b), labels].mean()
    return loss + alpha * ((q * (lq - lp)).sum() + (p * (lp - lq)).sum())


@pytest.mark.parametrize("scale", [0.5, 4.0])
def test_the_paper_form_equals_vit_src_in_value_and_gradient(scale):
    logits = _logits(scale, batch=5, classes=6, seed=3).astype(np.float64)
    labels = np.array([0, 5, 2, 2, 4])
    expected = _np_vit_src(logits, labels, alpha=0.3)
    grad = np.zeros_like(logits)  # central differences of the float64 formula
    step = 1e-6
    for index in np.ndindex(*logits.shape):
        up, down = logits.copy(), logits.copy()
        up[index] += step
        down[index] -= step
        grad[index] = (_np_vit_src(up, labels, 0.3) - _np_vit_src(down, labels, 0.3)) / (2 * step)
    x = paddle.to_tensor(logits.astype(np.float32), stop_gradient=False)
    parts = RDropLoss(alpha=0.3, form="paper")(x, paddle.to_tensor(labels))
    parts["loss"].backward()
    assert float(parts["loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(parts["loss"]) == pytest.approx(float(parts["ce"]) + 0.3 * float(parts["kl"]),
                                                 rel=1e-6)
    assert np.allclose(x.grad.numpy(), grad, rtol=1e-3, atol=1e-5)
    # Twice the mean form with summed KL: same direction, twice the size.
    mean_sum = RDropLoss(alpha=0.3, kl_reduction="sum")(paddle.to_tensor(
        logits.astype(np.float32)), paddle.to_tensor(labels))["loss"]
    assert float(parts["loss"]) == pytest.approx(2 * float(mean_sum), rel=1e-6)


def test_an_unknown_form_is_refused():
    with pytest.raises(ValueError, match="form must be one of"):
        RDropLoss(form="papers")
