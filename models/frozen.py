"""A model in training mode whose frozen part behaves as at test time."""

import paddle


def train_mode(model: paddle.nn.Layer, frozen_eval: bool = True) -> paddle.nn.Layer:
    """``model.train()``, then, with ``frozen_eval``, the frozen part back in eval mode (no
    dropout, attention dropout or drop path), as at test time: every layer whose parameters
    are all frozen, and every layer without parameters (a dropout) that feeds one. A FixRes
    stage thus fits its trained part on the features evaluation will give it."""
    model.train()
    if frozen_eval:
        _frozen_to_eval(model)
    return model


def _frozen_to_eval(layer: paddle.nn.Layer) -> None:
    children = [child for _, child in layer.named_children()]
    params = [list(child.parameters()) for child in children]
    trains = [any(not p.stop_gradient for p in group) for group in params]
    for i, child in enumerate(children):
        if params[i]:
            if trains[i]:
                _frozen_to_eval(child)
            else:
                child.eval()
            continue
        following = next((j for j in range(i + 1, len(children)) if params[j]), None)
        if following is not None and not trains[following]:
            child.eval()  # a parameterless layer (dropout) in front of a frozen one
