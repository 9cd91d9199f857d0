"""Models: PPIM DeiT/ViT constructors with a new head and pretrained-weight loading."""

from models.build import build_model, load_weights

__all__ = ["build_model", "load_weights"]
