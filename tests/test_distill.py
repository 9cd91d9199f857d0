"""Distillation into DeiT's distillation head: the loss against float64 NumPy, the two heads
kept apart in training only, the teacher's sources and errors, and runs on the demo with a
demo-trained teacher."""

import hashlib
import json
import os

import numpy as np
import paddle
import pytest
from conftest import HANG_S, ROOT, TINY_MODEL_KWARGS, read_records, run_script, tiny_model_config

from losses import build_loss
from losses.distill import DistillationLoss
from losses.rdrop import CrossEntropyLoss, RDropLoss
from models.build import build_model
from training.config import load_config
from utils.errors import UserError
from utils.io.tensor_io import load_tensors, save_tensors


def _log_softmax(x):
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _rdrop(logits, labels, alpha):
    """R-Drop's mean form (batchmean KL) in float64, from the formula."""
    batch = len(labels)
    lp = _log_softmax(logits)
    ce = -lp[np.arange(2 * batch), np.concatenate([labels, labels])].mean()
    p1, p2 = np.exp(lp[:batch]), np.exp(lp[batch:])
    kl = 0.5 * ((p1 * (lp[:batch] - lp[batch:])).sum() + (p2 * (lp[batch:] - lp[:batch])).sum())
    return ce + alpha * kl / batch


def _distill(student, teacher, kind, tau):
    """The distillation term in float64: CE on the teacher's argmax, or tau^2 KL(t || s)."""
    if kind == "hard":
        return -_log_softmax(student)[np.arange(len(student)), teacher.argmax(-1)].mean()
    lt, ls = _log_softmax(teacher / tau), _log_softmax(student / tau)
    return (np.exp(lt) * (lt - ls)).sum(-1).mean() * tau ** 2


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_loss_value_and_gradient_match_float64_formulas(kind):
    rng = np.random.default_rng(3)
    batch, classes, alpha, share, tau = 6, 7, 0.7, 0.4, 3.0
    logits = rng.normal(0, 2, (2 * batch, 2 * classes))
    teacher = rng.normal(0, 2, (batch, classes))
    labels = rng.integers(0, classes, batch)
    loss = DistillationLoss(RDropLoss(alpha), kind, tau, share)
    x = paddle.to_tensor(logits.astype("float32"), stop_gradient=False)
    parts = loss(x, paddle.to_tensor(labels), paddle.to_tensor(teacher.astype("float32")))
    tiled = np.concatenate([teacher, teacher])
    want_distill = _distill(logits[:, classes:], tiled, kind, tau)
    want_base = _rdrop(logits[:, :classes], labels, alpha)
    assert float(parts["distill"]) == pytest.approx(want_distill, rel=1e-5)
    assert float(parts["loss"]) == pytest.approx((1 - share) * want_base + share * want_distill,
                                                 rel=1e-5)
    assert float(parts["ce"]) + alpha * float(parts["kl"]) == pytest.approx(want_base, rel=1e-5)
    parts["loss"].backward()
    grad = x.grad.numpy()
    # The distillation head's gradient in closed form: share x (softmax(s/tau) - target) x tau
    # (soft) or (softmax(s) - onehot(argmax t)) (hard), per row mean.
    rows = len(logits)
    student = logits[:, classes:]
    if kind == "soft":
        want = tau * (np.exp(_log_softmax(student / tau)) - np.exp(_log_softmax(tiled / tau)))
    else:
        want = np.exp(_log_softmax(student)) - np.eye(classes)[tiled.argmax(-1)]
    np.testing.assert_allclose(grad[:, classes:], share * want / rows, rtol=1e-4, atol=1e-7)


def _rdrop_paper(logits, labels, alpha):
    """The R-Drop authors' ViT objective in float64: CE(l1) + CE(l2) (batch means) plus
    alpha x (KL(p1||p2) + KL(p2||p1)) summed over batch and classes."""
    batch = len(labels)
    lp = _log_softmax(logits)
    ce = sum(-lp[rows, labels].mean() for rows in (np.arange(batch), batch + np.arange(batch)))
    p1, p2 = np.exp(lp[:batch]), np.exp(lp[batch:])
    kl = (p1 * (lp[:batch] - lp[batch:])).sum() + (p2 * (lp[batch:] - lp[:batch])).sum()
    return ce + alpha * kl


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_the_paper_form_sums_the_distillation_term_over_the_copies_like_its_ce(kind):
    """DeiT: loss = (1 - a) CE(class head) + a distill(dist head), per copy. The paper form
    sums its two copies' CEs, so the distillation term is summed over the copies too: the
    share of each head is the same as in the mean form (where both are means)."""
    rng = np.random.default_rng(4)
    batch, classes, alpha, share, tau = 5, 6, 0.3, 0.5, 2.0
    logits = rng.normal(0, 2, (2 * batch, 2 * classes))
    teacher = rng.normal(0, 2, (batch, classes))
    labels = rng.integers(0, classes, batch)
    student = logits[:, classes:]
    want_distill = sum(_distill(student[rows], teacher, kind, tau)
                       for rows in (slice(0, batch), slice(batch, 2 * batch)))
    want_base = _rdrop_paper(logits[:, :classes], labels, alpha)
    paper = DistillationLoss(RDropLoss(alpha, form="paper"), kind, tau, share)
    x = paddle.to_tensor(logits.astype("float32"), stop_gradient=False)
    parts = paper(x, paddle.to_tensor(labels), paddle.to_tensor(teacher.astype("float32")))
    assert float(parts["distill"]) == pytest.approx(want_distill, rel=1e-5)
    assert float(parts["loss"]) == pytest.approx((1 - share) * want_base + share * want_distill,
                                                 rel=1e-5)
    # The same ratio of the two heads' terms as the mean form, where each is a mean.
    mean = DistillationLoss(RDropLoss(alpha), kind, tau, share)(
        x, paddle.to_tensor(labels), paddle.to_tensor(teacher.astype("float32")))
    assert float(parts["distill"]) / float(parts["ce"]) == pytest.approx(
        float(mean["distill"]) / float(mean["ce"]), rel=1e-5)


def test_all_weight_on_distillation_leaves_the_class_head_without_gradient():
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.normal(size=(8, 10)).astype("float32"), stop_gradient=False)
    loss = DistillationLoss(CrossEntropyLoss(), "soft", 2.0, alpha=1.0)
    parts = loss(x, paddle.to_tensor(rng.integers(0, 5, 8)),
                 paddle.to_tensor(rng.normal(size=(8, 5)).astype("float32")))
    parts["loss"].backward()
    assert np.all(x.grad.numpy()[:, :5] == 0) and np.abs(x.grad.numpy()[:, 5:]).sum() > 0
    with pytest.raises(ValueError, match="both heads"):
        loss(x[:, :6], paddle.to_tensor(np.zeros(8, "int64")), paddle.zeros([8, 5]))


def test_separate_heads_in_training_and_ppims_average_in_evaluation():
    paddle.seed(0)
    model = build_model(tiny_model_config(drop_rate=0.0), two_heads=True)
    x = paddle.to_tensor(np.random.default_rng(1).normal(size=(3, 3, 32, 32)).astype("float32"))
    model.eval()
    averaged = model(x).numpy()
    cls, dist = model.forward_features(x)
    both = np.concatenate([model.head(cls).numpy(), model.head_dist(dist).numpy()], -1)
    np.testing.assert_allclose(averaged, (both[:, :10] + both[:, 10:]) / 2, rtol=1e-6, atol=1e-6)
    model.train()
    np.testing.assert_allclose(model(x).numpy(), both, rtol=1e-6, atol=1e-6)
    plain = tiny_model_config(drop_rate=0.0, name="VisionTransformer",
                              kwargs={"epsilon": 1e-6})
    with pytest.raises(UserError, match="distillation head"):
        build_model(plain, two_heads=True)


def _digest(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


SHORT = ["data.train_subset=320", "data.val_subset=120", "stages.0.epochs=2",
         "stages.1.epochs=1", "train.ema.enabled=false"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A demo teacher trained with cross-entropy (a short run)."""
    out = str(tmp_path_factory.mktemp("teacher"))
    args = ["-c", "configs/demo.yaml", "-o", "loss.rdrop=false", "-o", f"train.output_dir={out}"]
    for override in ["stages.0.epochs=6", "stages.1.epochs=2", "train.ema.enabled=false"]:
        args += ["-o", override]
    proc = run_script("main.py", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def _student(out, *overrides):
    args = ["-c", "configs/demo.yaml", "-o", f"train.output_dir={out}"]
    for override in [*SHORT, *overrides]:
        args += ["-o", override]
    return run_script("main.py", *args)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_a_demo_student_learns_from_a_demo_teacher(teacher, tmp_path, kind):
    weights = os.path.join(teacher, "best.safetensors")
    before = _digest(weights)
    proc = _student(str(tmp_path), f"distill={{teacher: {teacher}, type: {kind}, tau: 2.0, "
                    f"alpha: 0.5}}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _digest(weights) == before
    assert f"distillation teacher: {teacher}" in proc.stdout
    records = read_records(str(tmp_path))
    assert len(records) == 3
    for record in records:
        parts = record["train_ce"] + 1.0 * record["train_kl"]
        assert record["train_loss"] == pytest.approx(0.5 * parts + 0.5 * record["train_distill"],
                                                     rel=1e-5)
        assert record["train_distill"] > 0
    assert "= 0.5 x (ce" in proc.stdout and "+ 0.5 x distill" in proc.stdout


@pytest.mark.slow
def test_a_ppim_model_with_weights_teaches_and_bad_teachers_are_one_error(teacher, tmp_path):
    weights = os.path.join(teacher, "best.safetensors")
    kwargs = ", ".join(f"{k}: {v}" for k, v in TINY_MODEL_KWARGS.items())
    proc = _student(str(tmp_path / "ppim"), "stages.0.epochs=1", "stages.1.epochs=1",
                    f"distill={{teacher: DistilledVisionTransformer, weights: {weights}, "
                    f"kwargs: {{{kwargs}}}}}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train_distill" in read_records(str(tmp_path / "ppim"))[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (f"distill={{teacher: {empty}}}", "folder without config.yaml"),
        ("distill={teacher: no_such_model}", "neither a run folder"),
        ("distill={teacher: DistilledVisionTransformer}", "'distill.weights' is missing"),
        (f"distill={{teacher: {teacher}, weights: {tmp_path}/none.safetensors}}",
         f"distill.weights {tmp_path}/none.safetensors does not exist"),
        ("distill={teacher: x, tau: 0}", "'distill.tau' must be >= 0.01"),
        ("distill={teacher: x, type: medium}", "'distill.type' must be one of soft, hard"),
        ("distill={teacher: x, kwargs: {depth: 100000}}", "'distill.kwargs.depth' must be <="),
    ]
    for override, fragment in cases:
        proc = _student(str(tmp_path / "bad"), override)
        assert proc.returncode == 2 and fragment in proc.stderr, (override, proc.stderr[-800:])
    other = _student(str(tmp_path / "bad"), "model.num_classes=12",
                     f"distill={{teacher: {teacher}}}")
    assert other.returncode == 2 and "predicts 10 classes, this run 12" in other.stderr, \
        other.stderr[-800:]
    with pytest.raises(UserError, match="set model.head=linear"):
        load_config("configs/demo.yaml", ["model.head=mlp", "distill={teacher: x}"])


def test_build_loss_wraps_the_base_loss_only_with_a_distill_section():
    cfg = load_config("configs/demo.yaml", ["distill={teacher: t, type: soft, tau: 4.0}"])
    loss = build_loss(cfg.loss, cfg.distill)
    assert isinstance(loss, DistillationLoss) and isinstance(loss.base, RDropLoss)
    assert (loss.kind, loss.tau, loss.alpha, loss.copies) == ("soft", 4.0, 0.5, 2)
    assert isinstance(build_loss(cfg.loss), RDropLoss)


@pytest.mark.slow
def test_preflight_times_a_distilled_fixres_run_with_its_teacher(teacher, tmp_path):
    proc = run_script("main.py", "-c", "configs/demo_fixres.yaml", "-o",
                      f"train.output_dir={tmp_path}", "-o", f"distill={{teacher: {teacher}}}",
                      "--preflight", "--json", timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)  # standard output is the report alone
    assert [s["stage"] for s in report["stages"]] == [0, 1, 2] and report["fits"]
    assert all(s["step_s"] > 0 for s in report["stages"])
    assert "stage 2 trains 6 of 35 parameter tensors" in proc.stderr
    dry = run_script("main.py", "-c", "configs/demo_fixres.yaml", "-o",
                     f"distill={{teacher: {teacher}, type: soft, tau: 5.0}}", "--dry-run")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "soft (temperature 5)" in dry.stdout and "at 32 px" in dry.stdout
    stage_lines = [line for line in dry.stdout.splitlines() if line.startswith("  [")]
    assert [" at 24 px," in line for line in stage_lines] == [True, True, False]
    assert all(f"distillation from {teacher} (soft, alpha=0.5)" in line for line in stage_lines)
    assert "trains head, head_dist, norm only" in dry.stdout


@pytest.mark.slow
def test_a_resume_with_another_teacher_or_a_teacher_still_training_is_one_error(
        teacher, tmp_path, monkeypatch):
    """The teacher is pinned in the checkpoint by its weights' SHA-256; a teacher folder
    that a live run holds is refused (its best weights may change)."""
    from conftest import stop_at_evaluation

    from main import train
    from training.amp import Precision
    from training.teacher import build_teacher
    from utils.run_folder import RunFolder

    copy = tmp_path / "teacher"
    copy.mkdir()
    for name in ("config.yaml", "best.safetensors"):
        (copy / name).write_bytes(open(os.path.join(teacher, name), "rb").read())
    cfg = load_config("configs/demo.yaml", [f"train.output_dir={tmp_path / 'student'}",
                                             f"distill={{teacher: {copy}}}",
                                             "train.progress=off", *SHORT])
    stop_at_evaluation(cfg, 1, monkeypatch)
    from utils.checkpoint import find_last, load_last

    pinned = load_last(find_last(cfg.train.output_dir), trees=False)[0]["teacher"]
    assert pinned["sha256"] == hashlib.sha256((copy / "best.safetensors").read_bytes()).hexdigest()
    weights, metadata = load_tensors(str(copy / "best.safetensors"))
    weights["head.bias"] = weights["head.bias"] + 1.0
    save_tensors(str(copy / "best.safetensors"), weights, metadata)
    with pytest.raises(UserError, match="the distillation teacher's weights differ from those "
                                        "the checkpoint"):
        train(cfg, resume=True)
    held = RunFolder(str(copy))
    held.hold(resume=True)
    try:
        with pytest.raises(UserError, match="is the output folder of a run that is still going"):
            build_teacher(cfg.distill, 10, Precision())
    finally:
        held.release()


def test_a_teacher_folder_whose_config_asks_ppim_to_load_is_refused(tmp_path):
    from training.amp import Precision
    from training.teacher import build_teacher

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    text = open(os.path.join(ROOT, "configs", "demo.yaml"), encoding="utf-8").read()
    (teacher / "config.yaml").write_text(text.replace("    epsilon: 1.0e-6",
                                                      "    epsilon: 1.0e-6\n    pretrained: true"))
    cfg = load_config("configs/demo.yaml", [f"distill.teacher={teacher}"])
    with pytest.raises(UserError, match="model.kwargs.pretrained' is not accepted"):
        build_teacher(cfg.distill, 10, Precision())
