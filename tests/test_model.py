"""models/: building PPIM models with a new head, loading weights and skipping the ImageNet
heads; weights that are refused (non-finite, another model, pickle at build time) and
models too large for the machine; recompute."""

import numpy as np
import paddle
import pytest
from conftest import (
    DEMO_CLI,
    FAST_CLI,
    SUBSET_CLI,
    TINY_MODEL_KWARGS,
    assert_one_error,
    out_args,
    run_script,
    tiny_model_config,
    tiny_weights_file,
)

from data.digits import load_digits
from data.preprocess import DevicePreprocess
from losses import RDropLoss
from models.build import _no_weight_loading, build_model, input_size, load_weights, pretrained_url
from models.resolution import resample_pos_embed
from utils.config import validate
from utils.errors import UserError
from utils.io.tensor_io import save_tensors
from utils.schema import MODEL, Node


def test_tiny_distilled_vit_has_new_heads_and_dropout(tiny_model_cfg):
    paddle.seed(0)
    model = build_model(tiny_model_cfg)
    assert model.head.weight.shape == [64, 10] and model.head_dist.weight.shape == [64, 10]
    assert model.blocks[0].mlp.drop.p == 0.1 and len(model.blocks) == 2
    model.eval()
    out = model(paddle.rand([3, 3, 32, 32]))
    assert out.shape == [3, 10]
    model.train()
    x = paddle.rand([2, 3, 32, 32])
    doubled = model(paddle.concat([x, x]))
    assert not np.allclose(doubled[:2].numpy(), doubled[2:].numpy())  # two dropout masks


def test_imagenet_heads_are_skipped_and_backbone_loaded(tmp_path, tiny_model_cfg):
    paddle.seed(1)
    source_cfg = Node(tiny_model_cfg, num_classes=1000)
    source = build_model(source_cfg)
    path = str(tmp_path / "imagenet.pdparams")
    paddle.save(source.state_dict(), path)
    paddle.seed(2)
    model = build_model(Node(tiny_model_cfg, pretrained=path))
    summary = load_weights(model, path)
    heads = {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}
    assert set(summary["skipped"]) == heads and set(summary["missing"]) == heads
    assert summary["skipped"]["head.weight"] == "shape [64, 1000] != model [64, 10]"
    assert summary["loaded"] == len(source.state_dict()) - 4
    assert np.array_equal(model.pos_embed.numpy(), source.pos_embed.numpy())
    assert np.array_equal(model.blocks[1].attn.qkv.weight.numpy(),
                          source.blocks[1].attn.qkv.weight.numpy())
    with pytest.raises(UserError, match="does not fit this model"):
        load_weights(model, path, strict=True)


def test_mlp_head_keeps_imagenet_heads_and_adds_the_originals_head(tmp_path, tiny_model_cfg):
    source = build_model(Node(tiny_model_cfg, num_classes=1000))
    path = str(tmp_path / "imagenet.pdparams")
    paddle.save(source.state_dict(), path)
    model = build_model(Node(tiny_model_cfg, head="mlp", mlp_hidden=16, pretrained=path))
    assert model.fc1.weight.shape == [1000, 16] and model.fc2.weight.shape == [16, 10]
    assert np.array_equal(model.backbone.head.weight.numpy(), source.head.weight.numpy())
    model.eval()
    assert model(paddle.rand([2, 3, 32, 32])).shape == [2, 10]
    own = str(tmp_path / "own.pdparams")
    paddle.save(model.state_dict(), own)
    assert load_weights(model, own, strict=True)["loaded"] == len(model.state_dict())


@pytest.mark.slow
def test_real_deit_b_distilled_384_gives_100_logits_at_384px():
    cfg = validate({"num_classes": 100, "pretrained": False, "drop_rate": 0.3}, MODEL, "model")
    paddle.seed(0)
    model = build_model(cfg)
    assert input_size(model) == 384
    assert sum(int(np.prod(p.shape)) for p in model.parameters()) > 85_000_000
    model.eval()
    with paddle.no_grad():
        out = model(paddle.rand([2, 3, 384, 384]))
    assert out.shape == [2, 100] and np.isfinite(out.numpy()).all()
    assert pretrained_url("deit_b_distilled_384").startswith("https://")


def test_wrong_model_name_kwargs_and_image_size_are_user_errors(tiny_model_cfg):
    with pytest.raises(UserError, match="model.name 'resnet' is not a PPIM model"):
        build_model(Node(tiny_model_cfg, name="resnet"))
    with pytest.raises(UserError, match="model.kwargs do not fit deit_s"):
        build_model(Node(tiny_model_cfg, name="deit_s", kwargs=dict(TINY_MODEL_KWARGS)))
    with pytest.raises(UserError, match="data.image_size=36 must be a multiple of the patch size 8"):
        build_model(tiny_model_cfg, image_size=36)


def test_another_resolution_resamples_position_embedding_and_keeps_tokens(tmp_path, tiny_model_cfg):
    paddle.seed(0)
    trained = build_model(tiny_model_cfg)
    path = str(tmp_path / "w.safetensors")
    save_tensors(path, trained.state_dict())
    same = build_model(tiny_model_cfg, image_size=32)
    summary = load_weights(same, path, strict=True)
    assert summary["resampled"] == [] and input_size(same) == 32
    x = paddle.rand([2, 3, 32, 32])
    trained.eval()
    same.eval()
    assert np.array_equal(same(x).numpy(), trained(x).numpy())  # identity at its resolution
    larger = build_model(tiny_model_cfg, image_size=48)
    summary = load_weights(larger, path, strict=True)
    assert summary["resampled"] == ["pos_embed"] and input_size(larger) == 48
    old, new = trained.pos_embed.numpy(), larger.pos_embed.numpy()
    assert new.shape == (1, 2 + 6 * 6, 64) and old.shape == (1, 2 + 4 * 4, 64)
    assert np.array_equal(new[:, :2], old[:, :2])  # class and distillation tokens kept
    assert np.allclose(resample_pos_embed(old, 2, 4), old)
    larger.eval()
    assert larger(paddle.rand([2, 3, 48, 48])).shape == [2, 10]
    # Bicubic resampling of a smooth (linear) grid stays close to the linear grid at 6x6.
    ramp = np.linspace(0, 1, 4, dtype=np.float32)
    smooth = np.broadcast_to(ramp[None, :, None] + ramp[:, None, None], (4, 4, 3)).reshape(1, 16, 3)
    fine = resample_pos_embed(np.concatenate([np.zeros((1, 2, 3), np.float32), smooth], 1), 2, 6)
    grid = fine[0, 2:, 0].reshape(6, 6)
    assert np.all(np.diff(grid, axis=0) > 0) and np.all(np.diff(grid, axis=1) > 0)


def test_pretrained_download_offline_is_one_clear_error(monkeypatch, tiny_model_cfg):
    def unreachable(*args, **kwargs):
        raise OSError(-2, "Name or service not known")

    monkeypatch.setattr("utils.io.download.socket.create_connection", unreachable)
    monkeypatch.setattr("utils.io.download.os.path.isfile", lambda path: False)
    cfg = Node(tiny_model_cfg, name="deit_ti", kwargs={}, pretrained=True)
    with pytest.raises(UserError) as info:
        build_model(cfg)
    assert "PPIM's deit_ti ImageNet weights is not available offline" in str(info.value)
    assert "-o model.pretrained=" in str(info.value)


def test_drop_path_zeroes_whole_samples_and_scales_the_rest():
    model = build_model(tiny_model_config(drop_path_rate=0.3), load_pretrained=False)
    layer = model.blocks[-1].drop_path  # PPIM's last block has the full rate
    assert type(layer).__module__ == "models.drop_path" and layer.drop_prob == 0.3
    x = np.random.default_rng(0).normal(size=(64, 5, 8)).astype("float32")
    paddle.seed(3)
    draws = paddle.rand([64, 1, 1]).numpy().astype(np.float64)
    expected = x / 0.7 * np.floor(draws + 0.7)  # float64, from the formula
    paddle.seed(3)
    layer.train()
    got = layer(paddle.to_tensor(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    dropped = np.all(got == 0, axis=(1, 2))
    assert 0 < dropped.sum() < 64  # whole samples, some of them
    layer.eval()
    assert np.array_equal(layer(paddle.to_tensor(x)).numpy(), x)


def test_zero_head_init_zeroes_new_heads_only(tmp_path, tiny_model_cfg, capsys):
    paddle.seed(1)
    scratch = build_model(Node(tiny_model_cfg, head_init="zero"))
    for name in ("head", "head_dist"):
        layer = getattr(scratch, name)
        assert not layer.weight.numpy().any() and not layer.bias.numpy().any(), name
    assert scratch.blocks[0].attn.qkv.weight.numpy().any()  # the rest as PPIM initialises it
    scratch.eval()
    logits = scratch(paddle.rand([2, 3, 32, 32])).numpy()
    assert np.array_equal(logits, np.zeros_like(logits))  # every class equally likely
    imagenet = build_model(Node(tiny_model_cfg, num_classes=1000))
    path = str(tmp_path / "imagenet.pdparams")
    paddle.save(imagenet.state_dict(), path)
    fine_tune = build_model(Node(tiny_model_cfg, pretrained=path, head_init="zero"))
    assert not fine_tune.head.weight.numpy().any()  # the 1000-class head did not fit
    assert "model.head_init=zero: head, head_dist set to zero" in capsys.readouterr().out
    own = str(tmp_path / "own.pdparams")
    paddle.save(build_model(tiny_model_cfg).state_dict(), own)  # a 10-class model's heads
    again = build_model(Node(tiny_model_cfg, pretrained=own, head_init="zero"))
    assert again.head.weight.numpy().any()  # loaded heads are kept
    assert "model.head_init=zero: no new head set to zero" in capsys.readouterr().out


@pytest.mark.slow
def test_nan_weights_are_never_loaded(tmp_path):
    paddle.seed(0)
    state = build_model(tiny_model_config()).state_dict()
    state = {k: v.numpy() for k, v in state.items()}
    state["blocks.0.attn.qkv.weight"][0, 0] = np.nan
    path = str(tmp_path / "nan.safetensors")
    save_tensors(path, state)
    assert_one_error(run_script("val.py", *DEMO_CLI, "--weights", path),
                     "holds non-finite values (1 tensors, e.g. blocks.0.attn.qkv.weight)")
    assert_one_error(run_script("main.py", *DEMO_CLI, *FAST_CLI, *out_args(tmp_path), "-o",
                                f"model.pretrained={path}"), "holds non-finite values")


@pytest.mark.parametrize("kwargs, fragment", [
    ({"embed_dim": 8192, "mlp_ratio": 64.0}, "GB of weights, gradients and optimizer state"),
    ({"patch_size": 1, "img_size": 1024}, "GB of activations per training image"),
    ({"depth": 128, "embed_dim": 8192, "num_heads": 8}, "more than this machine's"),
])
def test_a_model_too_large_for_the_machine_is_refused_before_it_is_built(kwargs, fragment):
    with pytest.raises(UserError, match=fragment):
        build_model(tiny_model_config(kwargs=kwargs))


def test_paddle_load_is_refused_while_a_ppim_model_builds():
    real = paddle.load
    with _no_weight_loading("deit_x"):
        with pytest.raises(UserError, match="PPIM's deit_x tried to load weights with "
                                            "paddle.load"):
            paddle.load("/nonexistent.pdparams")
    assert paddle.load is real
    build_model(tiny_model_config())  # a build that loads nothing is unaffected


def test_recompute_gives_the_same_loss_and_gradients_with_dropout_on():
    images, labels = load_digits("train")
    x = DevicePreprocess(32)(paddle.to_tensor(images[:8]))
    y = paddle.to_tensor(labels[:8])
    results = []
    for recompute in (False, True):
        paddle.seed(0)
        model = build_model(tiny_model_config(drop_rate=0.3, attn_drop_rate=0.1,
                                              drop_path_rate=0.1, recompute=recompute))
        if results:
            model.set_state_dict(results[0][2])
        assert sum(type(b).__name__ == "RecomputedBlock" for b in model.blocks) == 2 * recompute
        paddle.seed(5)  # the same dropout masks for both models
        parts = RDropLoss(alpha=5.0)(model(paddle.concat([x, x])), y)
        parts["loss"].backward()
        assert float(parts["kl"]) > 0  # the two copies did get different masks
        results.append((float(parts["loss"]),
                        {n: p.grad.numpy() for n, p in model.named_parameters()},
                        model.state_dict()))
    assert results[0][0] == results[1][0]
    for name, grad in results[0][1].items():
        np.testing.assert_allclose(results[1][1][name], grad, rtol=1e-6, atol=1e-9, err_msg=name)


@pytest.mark.slow
def test_pretrained_weights_of_another_model_name_mismatched_tensors(tmp_path):
    other = tiny_weights_file(tmp_path, "other.pdparams", embed_dim=32)
    proc = run_script("main.py", *DEMO_CLI, *SUBSET_CLI, "-o", f"model.pretrained={other}",
                      "-o", f"train.output_dir={tmp_path / 'out'}")
    assert_one_error(proc, "is for another model (", "e.g. pos_embed: shape [1, 18, 32] "
                     "!= model [1, 18, 64]", "model.name or model.kwargs")
