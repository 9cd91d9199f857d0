"""R-Drop loss: cross-entropy on two dropout passes plus their symmetric KL divergence."""

import paddle
import paddle.nn as nn

from losses.parts import value_text

KL_REDUCTIONS = ("batchmean", "sum")
FORMS = ("mean", "paper")


def log_softmax(logits: paddle.Tensor) -> paddle.Tensor:
    """Exact float32 log-softmax over the last axis.

    Paddle's CPU ``log_softmax`` and ``cross_entropy`` clamp ``x - max(x)`` at
    -64, so a logit 100 below the largest comes out as -64 instead of -100.
    Shifting by the maximum and subtracting the log of the sum keeps every
    value exact (``exp`` of a very negative number underflows harmlessly to 0).
    """
    shifted = logits - logits.max(axis=-1, keepdim=True)
    return shifted - paddle.log(paddle.exp(shifted).sum(axis=-1, keepdim=True))


def nll(log_probs: paddle.Tensor, label: paddle.Tensor) -> paddle.Tensor:
    """Mean negative log-likelihood of integer labels ``[N]`` or ``[N, 1]``."""
    label = label.reshape([-1, 1]).astype("int64")
    return -paddle.take_along_axis(log_probs, label, axis=-1).mean()


class RDropLoss(nn.Layer):
    """R-Drop objective on the logits of ONE forward pass over ``[x; x]``.

    ``forward(logits, label)`` takes ``[2B, C]`` logits (rows ``0..B-1`` are the
    first copy) and labels ``[B]`` or ``[B, 1]``, and returns the scalars
    ``{"loss", "ce", "kl"}`` with

    - ``ce``: the mean of the two copies' cross-entropies,
    - ``kl``: ½(KL(p₁‖p₂) + KL(p₂‖p₁)) from log-probabilities, summed over classes
      and averaged over the batch (``"batchmean"``) or summed over everything
      (``"sum"``, as in the R-Drop authors' ``compute_kl_loss``),
    - ``loss = ce + alpha * kl``.

    ``form="paper"`` is the objective of the R-Drop authors' ViT code (``vit_src``):
    ``ce`` the SUM of the two copies' batch-mean cross-entropies and ``kl`` the SUM
    KL(p₁‖p₂) + KL(p₂‖p₁) over batch and classes (``kl_reduction`` does not apply), so that
    ``loss = ce + alpha * kl`` is twice the mean form with ``kl_reduction="sum"``: the same
    gradient direction, twice its size (which matters for SGD's effective learning rate).

    All of it is computed in float32 whatever the dtype of ``logits``.
    """

    copies = 2

    def __init__(self, alpha: float = 5.0, kl_reduction: str = "batchmean",
                 form: str = "mean") -> None:
        super().__init__()
        if kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {kl_reduction!r}")
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        self.alpha = alpha
        self.kl_reduction = kl_reduction
        self.form = form

    def forward(self, logits: paddle.Tensor, label: paddle.Tensor) -> dict[str, paddle.Tensor]:
        log_probs = log_softmax(logits.astype("float32"))
        batch = label.shape[0]
        if log_probs.shape[0] != 2 * batch:
            raise ValueError(f"expected logits of [2B, C] = [{2 * batch}, C] for {batch} labels, "
                             f"got {log_probs.shape}")
        ce = nll(log_probs, paddle.concat([label.reshape([-1]), label.reshape([-1])]))
        lp1, lp2 = log_probs[:batch], log_probs[batch:]
        diff = lp1 - lp2
        pointwise = paddle.exp(lp1) * diff - paddle.exp(lp2) * diff
        if self.form == "paper":
            ce, kl = 2.0 * ce, pointwise.sum()
        else:
            kl = 0.5 * pointwise.sum()
            if self.kl_reduction == "batchmean":
                kl = kl / batch
        return {"loss": ce + self.alpha * kl, "ce": ce, "kl": kl}

    def terms(self, means: dict) -> str:
        """The loss as its parts' means (``means``) add up to it."""
        return f"ce {value_text(means['ce'])} + {self.alpha:g} x kl {value_text(means['kl'])}"

    def in_words(self, means: dict) -> str:
        """The epoch's ``loss`` and its terms, for the epoch line."""
        return f"loss {value_text(means['loss'])} = {self.terms(means)}"


class CrossEntropyLoss(nn.Layer):
    """The plain baseline: cross-entropy on one copy, with the same dict of parts (kl = 0)."""

    copies = 1

    def forward(self, logits: paddle.Tensor, label: paddle.Tensor) -> dict[str, paddle.Tensor]:
        ce = nll(log_softmax(logits.astype("float32")), label)
        return {"loss": ce, "ce": ce, "kl": paddle.zeros_like(ce)}

    def terms(self, means: dict) -> str:
        """The loss as its parts' means (``means``) add up to it."""
        return f"ce {value_text(means['ce'])}"

    def in_words(self, means: dict) -> str:
        """The epoch's ``loss``, which is its cross-entropy, for the epoch line."""
        return f"loss {value_text(means['loss'])} (cross-entropy)"
