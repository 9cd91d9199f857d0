"""The run plan (``--dry-run --json``): counts from the config alone, checked against counts
made independently (the operations a real forward pass runs) and against measurements."""

import json
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest
from conftest import HANG_S, ROOT, assert_one_error, run_script, tiny_model_config

from models.build import build_model
from models.cost import activation_bytes, forward_flops
from planning.plan import model_shape, plan
from training.config import load_config
from utils.runtime.device import peaks_reset
from utils.schema import ModelConfig

# bench/memory.py on this project's 2-core CPU (docs/measured.md, 2026-12-07): deit_b_distilled_384
# at 384 px, float32, one R-Drop step ([x; x]), bytes per image: the tensors (Paddle's allocator)
# and the process's peak resident set.
MEASURED_BYTES_PER_IMAGE = {"plain": (1.164e9, 1.575e9), "recompute": (0.166e9, 0.401e9)}


def _executed_flops(model, size):
    """FLOPs of the matmuls and convolutions one forward pass of ``model`` runs, counted from
    the shapes of the tensors they see (Linear and Conv2D layers by hooks, the attention's
    ``Tensor.matmul`` by wrapping it)."""
    count = [0]

    def linear(layer, inputs, output):
        count[0] += 2 * int(np.prod(inputs[0].shape[:-1])) * layer.weight.shape[0] * \
            layer.weight.shape[1]

    def conv(layer, inputs, output):
        out_channels, in_channels, kh, kw = layer.weight.shape
        count[0] += 2 * int(np.prod(output.shape)) * in_channels * kh * kw

    hooks = [layer.register_forward_post_hook(linear) for layer in model.sublayers()
             if isinstance(layer, paddle.nn.Linear)]
    hooks += [layer.register_forward_post_hook(conv) for layer in model.sublayers()
              if isinstance(layer, paddle.nn.Conv2D)]
    real = paddle.Tensor.matmul

    def matmul(x, y, *args, **kwargs):
        count[0] += 2 * int(np.prod(x.shape[:-1])) * x.shape[-1] * y.shape[-1]
        return real(x, y, *args, **kwargs)

    paddle.Tensor.matmul = matmul
    try:
        model.eval()
        with paddle.no_grad():
            model(paddle.zeros([1, 3, size, size]))
    finally:
        paddle.Tensor.matmul = real
        for hook in hooks:
            hook.remove()
    return count[0]


def test_the_size_check_counts_a_model_as_the_plan_does_before_it_is_built():
    """The shape read from the constructor's arguments (before building: the size check)
    and from the built model (the plan) agree for DeiT-B/384, so both price it alike."""
    from models.build import ppim_constructor
    from models.cost import declared_shape

    cfg = load_config("configs/rdrop_deit_b_384_cifar100.yaml").model
    built = model_shape(ModelConfig(cfg, num_classes=1000))
    declared = declared_shape(ppim_constructor(cfg.name), {})
    same = ("dim", "depth", "heads", "hidden", "patch", "channels", "tokens", "classes")
    assert {k: declared[k] for k in same} == {k: built[k] for k in same}
    assert declared["params"] == built["params"]
    assert forward_flops(declared) == forward_flops(built)


@pytest.mark.parametrize("size", [32, 48])
def test_forward_flops_equal_the_operations_a_forward_pass_runs(size):
    cfg = tiny_model_config()
    model = build_model(cfg, image_size=size)
    assert forward_flops(model_shape(cfg, size)) == _executed_flops(model, size)


def test_deit_b_384_flops_match_the_published_count():
    cfg = load_config("configs/rdrop_deit_b_384_cifar100.yaml").model
    shape = model_shape(cfg)
    # DeiT's paper: 55.5 G multiply-adds for DeiT-B at 384 ("FLOPs" there count those).
    assert forward_flops(shape) / 2 == pytest.approx(55.5e9, rel=0.01)
    assert shape["params"] == pytest.approx(86.2e6, rel=0.01)


@pytest.mark.parametrize("kind, recompute", [("plain", False), ("recompute", True)])
def test_activation_estimate_agrees_with_the_cpu_measurement(kind, recompute):
    cfg = load_config("configs/rdrop_deit_b_384_cifar100.yaml").model
    cfg = ModelConfig(cfg, recompute=recompute)
    estimate = 2 * activation_bytes(model_shape(cfg), cfg, None, False)  # two copies, float32
    tensors, process = MEASURED_BYTES_PER_IMAGE[kind]
    # Never below the tensors; at most what the process held, and within 1.4x of the tensors.
    assert tensors <= estimate <= max(process, 1.4 * tensors), (estimate, tensors, process)


@pytest.mark.slow
def test_the_paper_recipe_plan_is_one_json_document():
    proc = run_script("main.py", "-c", "configs/rdrop_paper_recipe.yaml", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    cost = json.loads(proc.stdout)
    assert cost["total_images"] == 5_120_000 and cost["total_optimizer_steps"] == 10_000
    assert set(cost["hours"]) == {"V100-16GB", "V100-32GB", "A100-40GB"}
    assert {"flops_per_image", "activation_bytes_per_image", "memory_bytes", "fits",
            "disk_bytes", "stages", "hours_range", "memory_basis", "fixes"} <= set(cost)


def _paper_recipe_validations():
    """Validations of the paper recipe, position by position: 45,000 training images / 512 =
    87 steps an epoch, one at each epoch's end and at every 100th step, over 10,000 steps."""
    return sum(1 for step in range(1, 10_001) if step % 87 == 0 or step % 100 == 0
               or step == 10_000)


def test_the_paper_recipe_hours_are_its_work_over_the_published_rates():
    """Training (5.12 M images x 667 GFLOPs), its validations (5,000 held-out images each) and
    the final test (10,000 images, best and last) at the middle of each card's published
    utilisation: fp16 V100 0.14-0.16 of 125 TFLOP/s, A100 0.10-0.12 of 312."""
    cost = plan(load_config("configs/rdrop_paper_recipe.yaml"))
    forward = cost["stages"][0]["eval_flops_per_image"]
    assert forward / 1e9 == pytest.approx(111.2, rel=0.01)
    assert _paper_recipe_validations() == 213
    work = 5.12e6 * cost["flops_per_image"] + (213 * 5000 + 2 * 10_000) * forward
    for gpu, peak, (low, high) in (("V100-32GB", 125e12, (0.14, 0.16)),
                                   ("A100-40GB", 312e12, (0.10, 0.12))):
        assert cost["hours"][gpu] == pytest.approx(work / (peak * (low + high) / 2) / 3600)
        assert cost["hours_range"][gpu] == pytest.approx(
            [work / (peak * high) / 3600, work / (peak * low) / 3600])


@pytest.mark.parametrize("amp, gpu, band", [("fp16", "V100-32GB", (45, 62)),
                                            ("fp16", "A100-40GB", (24, 36)),
                                            ("off", "V100-32GB", (85, 150)),
                                            ("bf16", "V100-32GB", (85, 150))])
def test_the_paper_recipe_hours_fall_within_the_published_runs(amp, gpu, band):
    """zpc-666/Paddle-R-Drop: 54.4 h on a V100-32GB in fp16 (50 h of steps); DeiT's 384 px
    fine-tune: about 51 V100-hours; Paddle's A100 fp16 ViT-B/384 rates: 26-32 h; float32 on a
    V100 (bf16 falls back to it there): 85-150 h from PaddleClas's fp32 rates."""
    cost = plan(load_config("configs/rdrop_paper_recipe.yaml", [f"train.amp={amp}"]))
    low, high = cost["hours_range"][gpu]
    assert band[0] <= low < cost["hours"][gpu] < high <= band[1]


def test_the_reproduction_plan_counts_its_held_out_images_and_stage_budgets():
    # The front pages' table is for Paddle 3.3 (requirements.txt), whatever runs the test.
    cost = plan(load_config("configs/rdrop_deit_b_384_cifar100.yaml"), (3, 3, 1))
    steps = [s["optimizer_steps"] for s in cost["stages"]]
    # 1,000-image subset: 41 steps x 10 epochs; then 45,000 images / 24 = 1,875 per epoch.
    assert steps == [41 * 10, 1875 * 2, 1875 * 3, 1875 * 2]
    assert cost["stages"][0]["upper_bound"] and not cost["stages"][3]["upper_bound"]
    assert cost["fits"]["V100-32GB"]


def test_offline_preflight_names_every_missing_download_at_once(monkeypatch):
    import data.cifar as cifar
    import main
    import models.build as build
    import utils.io.download as download

    monkeypatch.setattr(cifar, "default_archive_path", lambda c: "/nonexistent/archive.tar.gz")
    monkeypatch.setattr(build, "weights_cached", lambda url: False)
    monkeypatch.setattr(download, "_unreachable", lambda url: "Name or service not known")
    from utils.errors import UserError

    with pytest.raises(UserError) as caught:
        main.run_preflight(load_config("configs/rdrop_deit_b_384_cifar100.yaml"), as_json=True)
    message = str(caught.value)
    assert "2 download(s) cannot be made" in message
    assert "cifar-100-python.tar.gz from https://" in message
    assert "DeiT_base_distilled_patch16_384.pdparams from https://" in message


@pytest.mark.slow
def test_preflight_json_is_one_document_and_a_cpu_says_so_first():
    proc = run_script("main.py", "-c", "configs/demo.yaml", "-o", "stages.0.epochs=1",
                      "-o", "stages.1.epochs=1", "-o", "data.train_subset=256",
                      "--preflight", "--json", timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)  # the whole of standard output
    assert report["card"] is None and "stage_check_s" in report
    # What the stage check counted: 2 stages x (a training micro-batch of [x; x] and an
    # evaluation batch) x 2 blocks, all PPIM's computation on the CPU, as the plan assumes.
    assert report["attention"]["planned"] == {"fused": False, "kernel": None}
    observed = report["attention"]["observed"]
    assert (observed["calls"], observed["fused_calls"], observed["unfused_reasons"],
            observed["described"]) == (8, 0, ["CPU"], "not fused: CPU")
    # The plan's float32 count of the activations beside what the timed steps held.
    held = report["stages"][0]["activation_bytes_per_image"]
    assert held["planned"] == 2 * activation_bytes(
        model_shape(load_config("configs/demo.yaml").model), load_config(
            "configs/demo.yaml").model, None, False)
    if peaks_reset():
        assert 0.5 < held["ratio"] < 1.5, held
    else:
        assert held["observed"] is None
    # How long a stop takes here, against the launcher's grace; a late one is a warning.
    assert 0 < report["stop_s"] < report["launcher_grace_s"] == 30
    import io

    from planning.preflight_report import print_report

    table = io.StringIO()
    print_report({**report, "launcher_grace_s": 0}, out=table)
    assert (f"warning: a stop request is done within about {report['stop_s']:.3g} s here (the "
            f"longest step, 4 evaluation batches and the checkpoint): longer than the 0 s "
            f"paddle.distributed.launch waits") in table.getvalue()
    first = [line for line in proc.stderr.splitlines() if not line.startswith(("  ", "/"))
             and "Warning" not in line][0]
    assert first.startswith("preflight on cpu: no GPU here, so the times and memory below are "
                            "this machine's")


def test_the_heartbeat_names_the_phase_every_interval(capsys):
    import time

    from preflight import heartbeat

    with heartbeat(every=0.05) as phase:
        phase("timing the steps of stage 2")
        time.sleep(0.18)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 2 and all(line.startswith("preflight: timing the steps of stage 2 (")
                                   for line in lines)


@pytest.mark.slow
@pytest.mark.parametrize("language", ["en", "zh"])
def test_the_front_pages_budget_table_is_the_plans(language):
    import os

    from conftest import ROOT

    from planning.budget import PAGES, budget_markdown

    text = open(os.path.join(ROOT, PAGES[language]), encoding="utf-8").read()
    table = text.split("<!-- budget:start -->\n", 1)[1].split("\n<!-- budget:end -->", 1)[0]
    assert table.strip() == "\n".join(budget_markdown(language)).strip()


def test_a_known_gpu_gets_the_plans_rate_beside_the_measured_one(monkeypatch):
    """On a card of the table the report carries the plan's images per second (what a user's
    measurement is compared with to correct the card's rate); elsewhere nothing."""
    from types import SimpleNamespace

    from planning import preflight_report as report_module

    monkeypatch.setattr(paddle.device.cuda, "get_device_name", lambda: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(paddle.device.cuda, "get_device_properties",
                        lambda: SimpleNamespace(total_memory=32 * 2 ** 30 - 300 * 2 ** 20))
    cfg = load_config("configs/rdrop_paper_recipe.yaml")
    report = {"stages": [{"stage": 0, "train_images_per_s": 30.0}]}
    report_module.plan_rates(report, cfg, "gpu:0")
    assert report["card"] == "V100-32GB"
    flops = plan(cfg)["flops_per_image"]
    # The middle of the V100's published fp16 utilisation, 0.14-0.16, of its 125 TFLOP/s.
    assert report["stages"][0]["plan_images_per_s"] == pytest.approx(125e12 * 0.15 / flops)
    cpu = {"stages": [{"stage": 0, "train_images_per_s": 1.0}]}
    report_module.plan_rates(cpu, cfg, "cpu")
    assert cpu["card"] is None and "plan_images_per_s" not in cpu["stages"][0]


@pytest.mark.skipif(not peaks_reset(), reason="Paddle 2.6 cannot reset the host allocator's "
                                              "peak; Paddle 3 measures it")
def test_the_demo_models_memory_per_image_agrees_with_its_measured_peak():
    """The demo's tiny ViT, one R-Drop step in float32: the growth, per image from 64 to 512
    images, of the peak that Paddle's own host allocator records (exact and repeatable, unlike
    a process's resident set), against the plan's activations."""
    from paddle.base import core

    from data.preprocess import DevicePreprocess
    from losses import RDropLoss

    cfg = load_config("configs/demo.yaml", ["model.drop_rate=0.3"])
    paddle.seed(0)
    model = build_model(cfg.model, load_pretrained=False)
    model.train()

    def peak(batch):
        core.host_memory_stat_reset_peak_value("Allocated", 0)
        base = core.host_memory_stat_current_value("Allocated", 0)
        images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
        x = DevicePreprocess(32)(paddle.to_tensor(images))
        labels = paddle.to_tensor(np.arange(batch) % 10)
        RDropLoss(1.0)(model(paddle.concat([x, x])), labels)["loss"].backward()
        model.clear_gradients()
        return core.host_memory_stat_peak_value("Allocated", 0) - base

    measured = (peak(512) - peak(64)) / (512 - 64)
    estimate = 2 * activation_bytes(model_shape(cfg.model), cfg.model, None, False)
    assert estimate == pytest.approx(measured, rel=0.3)


@pytest.mark.slow
def test_bf16_is_sized_and_priced_as_float32_on_the_cards_without_it():
    """A V100 has no bfloat16, so a bf16 run trains there in float32 (training/amp.py): its
    memory and hours are float32's; an A100 keeps half precision."""
    recipe = "configs/rdrop_paper_recipe.yaml"
    costs = {amp: plan(load_config(recipe, [f"train.amp={amp}", "train.amp_level=O1"]))
             for amp in ("bf16", "off", "fp16")}
    bf16, fp32, fp16 = costs["bf16"], costs["off"], costs["fp16"]
    for gpu in ("V100-16GB", "V100-32GB"):
        assert bf16["precision"][gpu] == "off"
        assert bf16["memory_bytes"][gpu] == fp32["memory_bytes"][gpu]
        assert bf16["hours"][gpu] == fp32["hours"][gpu]
        assert bf16["fits"][gpu] == fp32["fits"][gpu]
    assert bf16["precision"]["A100-40GB"] == "bf16"
    assert bf16["memory_bytes"]["A100-40GB"] == fp16["memory_bytes"]["A100-40GB"] \
        < fp32["memory_bytes"]["A100-40GB"]
    assert fp16["precision"] == {gpu: "fp16" for gpu in fp16["precision"]}
    proc = run_script("main.py", "-c", recipe, "-o", "train.amp=bf16", "--dry-run")
    assert proc.returncode == 0
    assert "bf16 falls back to float32 on V100-16GB, V100-32GB: sized and priced there as " \
           "float32" in proc.stdout


def test_memory_counts_how_paddle_runs_each_card():
    """Fused attention (an A100; a V100 only from Paddle 3.3) holds no attention matrix; O1
    keeps the softmax and norms in float32, so it holds more than O2; a teacher adds its
    float32 weights; several GPUs add DataParallel's fused gradient copy."""
    recipe = "configs/rdrop_paper_recipe.yaml"
    cfg = load_config(recipe)
    shape = model_shape(cfg.model)
    tokens, heads = shape["tokens"], shape["heads"]
    old, new = plan(cfg, (2, 6, 2)), plan(cfg, (3, 3, 1))
    stage_old, stage_new = old["stages"][0], new["stages"][0]
    for version in ((2, 6, 2), (3, 0, 0), (3, 2, 1), (3, 2, 2)):  # flash attention only
        assert plan(cfg, version)["stages"][0]["fused_attention"] == {
            "V100-16GB": False, "V100-32GB": False, "A100-40GB": True}, version
    assert all(stage_new["fused_attention"].values())
    for level in ("O1", "O2"):  # O1's float32 Linear outputs are cast for the kernel
        assert plan(load_config(recipe, [f"train.amp_level={level}"]), (3, 3, 1))["stages"][0][
            "fused_attention"]["A100-40GB"]
    assert not any(plan(load_config(recipe, ["train.amp=off"]), (3, 3, 1))["stages"][0][
        "fused_attention"].values())
    # Per image (two copies), the V100's attention matrices under O1: the float32 softmax
    # output, its half copy and the float32 gradient beside them, 10 bytes per value, against
    # the fused kernel's float32 log-sum-exp per query.
    matrices = 2 * shape["depth"] * heads * (10 * tokens ** 2 - 4 * tokens)
    assert stage_old["activation_bytes_per_image"]["V100-32GB"] \
        - stage_new["activation_bytes_per_image"]["V100-32GB"] == matrices
    o2 = plan(load_config(recipe, ["train.amp_level=O2"]), (3, 3, 1))["stages"][0]
    assert o2["activation_bytes_per_image"]["A100-40GB"] \
        < stage_new["activation_bytes_per_image"]["A100-40GB"]
    assert new["data_parallel_extra_bytes"]["V100-32GB"] == shape["params"] * 4
    assert o2["data_parallel_extra_bytes"]["V100-32GB"] == shape["params"] * 2
    taught = plan(load_config(recipe, ["distill={teacher: deit_b_distilled_384}"]), (3, 3, 1))
    assert taught["stages"][0]["memory_parts"]["A100-40GB"]["teacher"] == shape["params"] * 4
    parts = stage_new["memory_parts"]["V100-32GB"]
    assert sum(parts.values()) == stage_new["memory_bytes"]["V100-32GB"]
    assert parts["reserved"] == 2 ** 30 and set(new["memory_basis"]) >= set(parts)


@pytest.mark.slow
def test_dry_run_prints_the_setting_that_fits_a_card_with_its_hours():
    proc = run_script("main.py", "-c", "configs/rdrop_paper_recipe.yaml", "-o", "train.amp=off",
                      "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert "V100-32GB: 49 GiB (does not fit" in text
    fix = text.split("V100-32GB:", 1)[1].splitlines()[1]
    assert "-o train.accum_steps=32 (same images per step and hours)" in fix
    assert "-o model.recompute=true" in fix and " h" in fix
    assert "not measured by this project" in text


@pytest.mark.slow
def test_the_plan_refuses_a_student_that_is_not_a_vit_and_says_so_of_such_a_teacher():
    proc = run_script("main.py", "-c", "configs/demo.yaml", "-o", "model.name=rexnet_1_0",
                      "-o", "model.kwargs={}", "--dry-run")
    assert_one_error(proc, "model 'rexnet_1_0' is not a ViT or DeiT", "--preflight")
    taught = plan(load_config("configs/rdrop_paper_recipe.yaml",
                              ["distill={teacher: rexnet_1_0}"]))
    plain = plan(load_config("configs/rdrop_paper_recipe.yaml"))
    assert not taught["teacher_flops_counted"] and plain["teacher_flops_counted"]
    assert taught["flops_per_image"] == plain["flops_per_image"]
    assert taught["stages"][0]["memory_parts"]["A100-40GB"]["teacher"] > 0


@pytest.mark.slow
def test_the_budget_table_in_an_unknown_language_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "planning.budget", "cn"], cwd=ROOT,
                          capture_output=True, text=True, timeout=HANG_S)
    assert_one_error(proc, "no budget table in 'cn'; use one of en, zh")


def test_the_cpu_warning_prices_every_stage_validation_and_test_at_the_rate_given():
    from planning.plan import CPU_WARN_HOURS, cpu_warning, plan

    cfg = load_config(os.path.join(ROOT, "configs/rdrop_deit_b_384_cifar100.yaml"), [])
    cost = plan(cfg)
    work = sum(s["images"] * s["flops_per_image"]
               + s["validated_images"] * s["eval_flops_per_image"] for s in cost["stages"])
    work += 2 * 10_000 * cost["stages"][-1]["eval_flops_per_image"]  # best and last, tested
    rate = 1e11
    line = cpu_warning(cfg, lambda: rate)
    assert line.startswith(f"warning: this run is {work / 1e15:,.0f} PFLOPs of work: at least "
                           f"{work / rate / 3600:,.0f} h on this CPU (100 GFLOP/s")
    assert cpu_warning(cfg, lambda: work / (CPU_WARN_HOURS * 3600) * 1.01) is None  # < 1 h
    # The demo: under an hour even on a CPU far slower than any; the CPU is not measured.
    demo = load_config(os.path.join(ROOT, "configs/demo.yaml"), [])
    assert cpu_warning(demo, lambda: pytest.fail("measured")) is None


def test_a_cpu_preflight_of_the_real_model_says_how_long_first():
    """The reproduction's preflight on a CPU: the stage check's 4 stages x 2 micro-batches x
    2 images, then 2 setups (AdamW, Momentum) x 5 steps x 24 images, each image an R-Drop
    training image (2 copies x a forward and a backward: 6 forwards) of DeiT-B/384."""
    from preflight import cpu_duration

    cfg = load_config("configs/rdrop_deit_b_384_cifar100.yaml")
    forward = forward_flops(model_shape(cfg.model))
    work = (4 * 2 * 2 + 2 * 5 * 24) * 6 * forward
    line = cpu_duration(cfg, lambda: 1e11)
    minutes, seconds = divmod(round(work / 1e11), 60)
    assert line == (f"warning: preflight's training steps of this config are "
                    f"{work / 1e12:,.0f} TFLOPs of work: at least {minutes} min {seconds:02d} s "
                    f"on this CPU (100 GFLOP/s measured on a matrix product just now); Ctrl-C "
                    f"stops it")

    def not_measured():
        raise AssertionError("the demo's preflight is too small to measure the CPU for")

    assert cpu_duration(load_config("configs/demo.yaml"), not_measured) is None


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_a_stage_without_a_whole_batch_is_the_runs_one_line_in_the_plan(extra):
    """A stage whose training subset holds no whole batch: --dry-run refused it with a
    ZeroDivisionError traceback; now with the line the run's loader gives."""
    proc = run_script("main.py", "-c", "configs/demo.yaml", "--dry-run", *extra,
                      "-o", "stages.0.data.train_subset=1")
    assert_one_error(proc, "the training split has 1 images, fewer than one batch of 32; "
                           "lower data.batch_size")
