"""Speed paths on the CPU that need no second process: fused attention against PPIM's and
its probe's decisions, AMP's fallback, half-precision weights through checkpoints and
averages, and the throughput benchmark."""

import json

import numpy as np
import paddle
import pytest
from conftest import HANG_S, run_script, tiny_model_config

import models.attention as attention
from models.build import build_model

SMALL = ["-o", "data.train_subset=256", "-o", "data.val_subset=100"]


def _tiny(fused, attn_drop=0.0):
    paddle.seed(0)
    return build_model(tiny_model_config(drop_rate=0.0, attn_drop_rate=attn_drop,
                                         fused_attention=fused))


def test_fused_attention_matches_ppims_with_the_same_weights():
    plain, fused = _tiny("off"), _tiny("on")
    assert [type(b.attn).__name__ for b in fused.blocks] == ["FusedAttention"] * 2
    assert list(fused.state_dict()) == list(plain.state_dict())  # PPIM's names: weights load
    fused.set_state_dict(plain.state_dict())
    x = paddle.to_tensor(np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype("float32"))
    outputs = []
    for model in (plain, fused):
        model.train()  # dropout rates are 0: train mode is deterministic here
        out = model(x)
        out.sum().backward()
        outputs.append((out.numpy(), model.blocks[0].attn.qkv.weight.grad.numpy()))
    assert np.allclose(outputs[0][0], outputs[1][0], atol=1e-5)
    assert np.allclose(outputs[0][1], outputs[1][1], atol=1e-5)


def test_fused_attention_applies_the_layers_dropout_rate(monkeypatch):
    model, seen = _tiny("on", attn_drop=0.3), []
    real = attention.F.scaled_dot_product_attention

    def record(*args, **kwargs):
        seen.append((kwargs["dropout_p"], kwargs["training"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", record)
    x = paddle.zeros([2, 3, 32, 32])
    model.train()
    model(x)
    model.eval()
    model(x)
    assert seen == [(0.3, True)] * 2 + [(0.0, False)] * 2


def _probe_says(monkeypatch, reason):
    """Replace the kernel probe by a fixed outcome on an A100-like GPU; return the probes it
    was asked for."""
    monkeypatch.setattr(paddle.device.cuda, "get_device_capability", lambda: (8, 0))
    asked = []
    monkeypatch.setattr(attention, "probe_kernel", lambda *args: asked.append(args) or reason)
    return asked


def test_auto_fuses_only_on_a_gpu_with_amp_where_the_kernel_passes_its_probe(monkeypatch):
    asked = _probe_says(monkeypatch, None)
    # PPIM's attention as configured: no line.
    assert attention.use_fused_attention(_tiny("off"), "auto", "cpu", "bf16", 17) is None
    assert attention.use_fused_attention(_tiny("off"), "auto", "gpu:0", "off", 17) is None
    assert asked == []  # nothing to probe: auto never fuses there
    model = _tiny("off")
    monkeypatch.setattr(paddle.device.cuda, "get_device_capability", lambda: (7, 0))  # a V100
    monkeypatch.setattr(paddle, "__version__", "3.3.1")  # (each version's kernel: below)
    line = attention.use_fused_attention(model, "auto", "gpu:0", "fp16", 17)
    assert line == ("attention: 2 layers use paddle.nn.functional.scaled_dot_product_attention "
                    "in float16, memory-efficient attention by Paddle's rule (probed on gpu:0)")
    assert asked == [("gpu:0", "float16", 17, 2, 32, 0.0)]  # tokens, heads, head_dim, dropout
    assert [b.attn.kernel_dtypes for b in model.blocks] == [("float16",)] * 2


@pytest.mark.parametrize("version, capability, dtype, kernel, runs", [
    ("3.3.1", (8, 0), "float16", "flash attention", True),
    ("3.3.1", (8, 0), "bfloat16", "flash attention", True),
    ("3.3.1", (7, 0), "float16", "memory-efficient attention", True),
    ("3.3.1", (8, 0), "float32", "memory-efficient attention", True),
    ("3.2.2", (7, 0), "float16", "flash attention", False),  # no card check before 3.3
    ("3.0.0", (7, 0), "float16", "flash attention", False),
    ("3.2.0", (8, 0), "float16", "flash attention", True),
    ("3.2.0", (8, 0), "float32", "flash attention", False),
    ("2.6.2", (8, 0), "float16", "flash attention", True),
    ("2.6.2", (7, 0), "float16", "flash attention", False),
])
def test_the_fused_kernel_is_named_as_paddle_selects_it(monkeypatch, version, capability, dtype,
                                                         kernel, runs):
    """Paddle 3.3's sdpa.py: flash attention in half precision from compute capability 8.0,
    the memory-efficient kernel below it or in float32; Paddle 2.6 - 3.2 call flash attention
    on every GPU (flash_attention.py), which fails below 8.0 and in float32."""
    monkeypatch.setattr(paddle, "__version__", version)
    monkeypatch.setattr(paddle.device.cuda, "get_device_capability", lambda: capability)
    assert attention.sdpa_kernel("gpu:0", dtype) == kernel
    assert attention.sdpa_kernel("cpu", dtype) == "math (unfused)"
    numbers = tuple(int(part) for part in version.split("."))
    assert attention.kernel_runs(capability[0], dtype, numbers) is runs


def test_bf16_o2_casts_layer_norm_weights_while_fp16_keeps_them_float32():
    """What the docs say of O2 is Paddle's rule (amp/auto_cast.py, need_keep_fp32): LayerNorm
    keeps float32 weights under fp16 only."""
    from paddle.amp.auto_cast import need_keep_fp32

    norm, linear = paddle.nn.LayerNorm(8), paddle.nn.Linear(8, 8)
    assert need_keep_fp32(norm, "float16") and not need_keep_fp32(norm, "bfloat16")
    assert not need_keep_fp32(linear, "float16")


def test_a_failed_probe_keeps_ppims_attention_with_auto_and_is_an_error_with_on(monkeypatch,
                                                                                 capsys):
    from utils.errors import UserError

    reason = "RuntimeError: FlashAttention only supports Ampere GPUs or newer."
    _probe_says(monkeypatch, reason)
    model = _tiny("off")
    capsys.readouterr()
    line = attention.use_fused_attention(model, "auto", "gpu:0", "fp16", 17)
    assert line == "attention: PPIM's (the fused kernel failed its probe on gpu:0)"
    assert capsys.readouterr().out == (
        f"warning: model.fused_attention=auto: scaled_dot_product_attention fails on gpu:0 in "
        f"float16 ({reason}); using PPIM's attention\n")
    assert {b.attn.kernel_dtypes for b in model.blocks} == {()}
    assert {b.attn.unfused_reason for b in model.blocks} == {
        "the fused kernel failed its probe on gpu:0"}
    with pytest.raises(UserError, match="model.fused_attention=on, but scaled_dot_product_"
                                        "attention fails on gpu:0 in bfloat16 .RuntimeError"):
        attention.use_fused_attention(_tiny("off"), "on", "gpu:0", "bf16", 17)


def test_a_float32_call_of_a_layer_fused_for_float16_takes_ppims_path(monkeypatch):
    plain = _tiny("off")
    _probe_says(monkeypatch, None)
    fused = _tiny("off")
    attention.use_fused_attention(fused, "auto", "gpu:0", "fp16", 17)
    fused.set_state_dict(plain.state_dict())

    def kernel(*args, **kwargs):
        raise AssertionError("the fused kernel was called with float32 inputs")

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", kernel)
    x = paddle.to_tensor(np.random.default_rng(1).normal(size=(3, 3, 32, 32)).astype("float32"))
    results = []
    for model in (plain, fused):
        model.train()
        out = model(x)
        out.sum().backward()
        results.append((out.numpy(), model.blocks[1].attn.qkv.weight.grad.numpy()))
    assert np.array_equal(results[0][0], results[1][0])  # PPIM's computation, exactly
    assert np.array_equal(results[0][1], results[1][1])


def test_the_real_probe_runs_here_and_leaves_the_random_stream_alone():
    paddle.seed(3)
    expected = paddle.rand([4]).numpy()
    paddle.seed(3)
    assert attention.probe_kernel.__wrapped__("cpu", "float32", 17, 2, 32, 0.1) is None
    assert np.array_equal(paddle.rand([4]).numpy(), expected)
    assert attention.probe_kernel("cpu", "float64x", 17, 2, 32, 0.0) is not None  # a bad dtype


@pytest.mark.slow
def test_amp_without_support_says_so_once_and_trains_in_float32(tmp_path):
    out = str(tmp_path / "amp")
    proc = run_script("main.py", "-c", "configs/demo.yaml", *SMALL, "-o", "stages.0.epochs=1",
                      "-o", "stages.1.epochs=1", "-o", f"train.output_dir={out}",
                      "-o", "train.amp=bf16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: train.amp=bf16 is not available on cpu (Paddle applies "
                        "bfloat16 AMP on GPUs that support it); using float32"]
    proc = run_script("val.py", "-c", "configs/demo.yaml", "-o", f"train.output_dir={out}",
                      "-o", "train.amp=fp16")
    assert proc.returncode == 0 and "warning: train.amp=fp16 is not available" in proc.stdout
    plan = run_script("main.py", "-c", "configs/rdrop_deit_b_384_cifar100.yaml", "--dry-run")
    assert "AMP fp16 (O1); fused attention auto" in plan.stdout


@pytest.mark.slow
def test_throughput_quick_prints_one_json_line():
    # No loader workers: the original's pipeline (kept as it was) builds Paddle tensors in
    # forked workers, which on a loaded machine has ended in a worker's segmentation fault.
    proc = run_script("bench/throughput.py", "--quick", "--steps", "2", "--warmup", "1",
                      "--workers", "0", timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert {"images_per_s", "seed_loop_images_per_s", "speedup_over_seed_loop",
            "device"} <= set(result)
    assert result["device"] == "cpu" and result["image_size"] == 64 and result["mfu"] is None
    assert result["speedup_over_seed_loop"] == pytest.approx(
        result["images_per_s"] / result["seed_loop_images_per_s"], rel=0.01)


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_precision_weights_save_average_and_load_as_float32(tmp_path, half):
    """What AMP O2 leaves in the model (half-precision weights) goes through checkpoints,
    EMA and weight swaps; on a CPU the weights are cast by hand (Paddle runs O2 on GPUs)."""
    from training.averaging import EMA, weights_in
    from utils.io.tensor_io import load_state, load_tensors, save_tensors

    model = _tiny("off")
    reference = {key: value.numpy().copy() for key, value in model.state_dict().items()}
    model.to(dtype=half)
    ema = EMA(model, decay=0.5, warmup=False)
    ema.update(model)
    assert all(str(value.dtype).endswith("float32") for value in ema.state_dict().values())
    path = str(tmp_path / "half.safetensors")
    save_tensors(path, model.state_dict())
    saved, _ = load_tensors(path)
    assert all(array.dtype == np.float32 for array in saved.values())
    for key, array in saved.items():  # the half-precision values, exactly, as float32
        assert np.allclose(array, reference[key], rtol=1e-2, atol=1e-2), key
    fresh = _tiny("off")
    fresh.to(dtype=half)
    load_state(fresh, saved)
    assert fresh.blocks[0].attn.qkv.weight.dtype == model.blocks[0].attn.qkv.weight.dtype
    assert np.array_equal(fresh.head.weight.astype("float32").numpy(), saved["head.weight"])
    with weights_in(fresh, ema.state_dict()):
        swapped = fresh.head.weight.astype("float32").numpy().copy()
    assert np.allclose(swapped, ema.state_dict()["head.weight"].numpy(), atol=1e-2)
    assert np.array_equal(fresh.head.weight.astype("float32").numpy(), saved["head.weight"])


def test_o2_on_a_cpu_falls_back_and_keeps_float32_weights(capsys):
    from training.amp import Precision

    precision = Precision("bf16", "cpu", "O2")
    model = precision.prepare(_tiny("off"))
    assert "warning: train.amp=bf16 is not available on cpu" in capsys.readouterr().out
    assert not precision.half_weights and model.head.weight.dtype == paddle.float32


class _Recorded:
    """A stand-in for the fused kernel on the CPU: records the dtype of q/k/v and computes
    attention in float64 from them (independently of PPIM's code)."""

    def __init__(self):
        self.dtypes = []

    def __call__(self, q, k, v, dropout_p=0.0, training=True):
        self.dtypes.append({str(t.dtype).split(".")[-1] for t in (q, k, v)})
        q64, k64, v64 = (t.astype("float32").numpy().astype(np.float64).transpose(0, 2, 1, 3)
                         for t in (q, k, v))
        scores = q64 @ k64.transpose(0, 1, 3, 2) / np.sqrt(q64.shape[-1])
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        return paddle.to_tensor((weights @ v64).transpose(0, 2, 1, 3).astype("float32"))


def test_under_o1_the_kernel_gets_half_inputs_whatever_the_linear_returned(monkeypatch):
    """Before Paddle 3.2.2 an O1 Linear returns float32: the attention casts q/k/v to the
    autocast dtype for the kernel, and the counts say every call took it. (The CPU has no
    half-precision autocast: the autocast state is set by hand, the kernel recorded.)"""
    plain = _tiny("off")
    _probe_says(monkeypatch, None)
    fused = _tiny("off")
    attention.use_fused_attention(fused, "auto", "gpu:0", "fp16", 17)
    fused.set_state_dict(plain.state_dict())
    kernel = _Recorded()
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", kernel)
    monkeypatch.setattr(attention, "autocast_dtype", lambda: "float16")
    x = paddle.to_tensor(np.random.default_rng(2).normal(size=(3, 3, 32, 32)).astype("float32"))
    plain.eval(), fused.eval()
    with attention.tallying_attention() as tally:
        out = fused(x).numpy()
    assert kernel.dtypes == [{"float16"}] * 2  # the Linear gave float32; the kernel half
    assert tally.to_json() == {"calls": 2, "fused_calls": 2, "dtypes": {"float16": 2},
                               "unfused_reasons": []}
    assert tally.describe() == "fused: 2 of 2 calls in float16"
    # PPIM's attention in float32 against the kernel on half-rounded q/k/v: float16's rounding
    assert np.abs(out - plain(x).numpy()).max() < 1e-2


def test_the_tally_counts_ppims_path_with_its_reason():
    model = _tiny("off")
    attention.use_fused_attention(model, "auto", "cpu", "off", 17)
    x = paddle.zeros([2, 3, 32, 32])
    with attention.tallying_attention() as tally:
        model(x)
        model(x)
    assert tally.to_json() == {"calls": 4, "fused_calls": 0, "dtypes": {"float32": 4},
                               "unfused_reasons": ["CPU"]}
    assert tally.describe() == "not fused: CPU"
    model(x)  # outside the block: nothing counted
    assert tally.total == 4
    off = _tiny("off")
    attention.use_fused_attention(off, "off", "gpu:0", "fp16", 17)
    with attention.tallying_attention() as tally:
        off(x)
    assert tally.describe() == "not fused: model.fused_attention=off"
