"""Knowledge distillation into DeiT's distillation head, beside the class head's own loss."""

import paddle
import paddle.nn as nn

from losses.parts import value_text
from losses.rdrop import log_softmax, nll

KINDS = ("soft", "hard")


class DistillationLoss(nn.Layer):
    """The class head learns from the labels with ``base`` (R-Drop or cross-entropy), the
    distillation head from a teacher's logits:

    - ``hard``: cross-entropy on the teacher's top class (DeiT's choice),
    - ``soft``: τ² · KL(softmax(t/τ) ‖ softmax(s/τ)), summed over classes and averaged over
      rows (Hinton et al.; DeiT's code divides by rows × classes instead);

    ``loss = (1 − alpha) · base + alpha · distill``. With the R-Drop paper form
    (``base.form == "paper"``), whose cross-entropy is the SUM of the two copies' means, the
    distillation term is summed over the copies in the same way, so that ``alpha`` weighs the
    two heads as DeiT does in either form. ``forward(logits, label,
    teacher_logits)`` takes ``[copies·B, 2C]`` logits of :class:`models.heads.SeparateHeads`
    (class head first; R-Drop's copies ``[x; x]`` each learn from the same teacher outputs)
    and ``[B, C]`` teacher logits; it returns the base's parts (``ce`` and ``kl`` are the
    class head's) with ``loss`` and ``distill``. All in float32.
    """

    def __init__(self, base: paddle.nn.Layer, kind: str = "hard", tau: float = 1.0,
                 alpha: float = 0.5) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.base, self.kind, self.tau, self.alpha = base, kind, tau, alpha
        self.copies = base.copies

    def forward(self, logits: paddle.Tensor, label: paddle.Tensor,
                teacher_logits: paddle.Tensor) -> dict[str, paddle.Tensor]:
        logits = logits.astype("float32")
        classes = teacher_logits.shape[-1]
        if logits.shape[-1] != 2 * classes:
            raise ValueError(f"expected logits of both heads, [N, 2 x {classes}], got "
                             f"{logits.shape}")
        parts = self.base(logits[:, :classes], label)
        student = logits[:, classes:]
        teacher = paddle.concat([teacher_logits.astype("float32")] * self.copies)
        if self.kind == "hard":
            distill = nll(log_softmax(student), teacher.argmax(axis=-1))
        else:
            target = log_softmax(teacher / self.tau)
            pointwise = paddle.exp(target) * (target - log_softmax(student / self.tau))
            distill = pointwise.sum() / student.shape[0] * self.tau ** 2
        if getattr(self.base, "form", "mean") == "paper":
            distill = distill * self.copies  # per copy, summed like the paper form's ce
        loss = (1.0 - self.alpha) * parts["loss"] + self.alpha * distill
        return dict(parts, loss=loss, distill=distill)

    def terms(self, means: dict) -> str:
        """The loss as its parts' means (``means``) add up to it."""
        return (f"{1 - self.alpha:g} x ({self.base.terms(means)}) + {self.alpha:g} x distill "
                f"{value_text(means.get('distill'))}")

    def in_words(self, means: dict) -> str:
        """The epoch's ``loss`` and its terms, for the epoch line."""
        return f"loss {value_text(means['loss'])} = {self.terms(means)}"
