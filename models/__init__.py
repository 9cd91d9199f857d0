"""Models: PPIM DeiT/ViT constructors with a new head and pretrained-weight loading."""
