"""Losses: the R-Drop objective and the plain cross-entropy baseline."""

from losses.rdrop import CrossEntropyLoss, RDropLoss, build_loss

__all__ = ["RDropLoss", "CrossEntropyLoss", "build_loss"]
