"""preflight.py (main.py --preflight): the report as one JSON line, and a micro-batch that
does not fit halved to one that does."""

import json

import pytest
from conftest import DEMO_CLI, HANG_S, run_script

from training import engine
from training.config import load_config
from utils.errors import UserError
from utils.runtime.device import peaks_reset


@pytest.mark.slow
def test_preflight_measures_the_demo_in_one_json_line():
    proc = run_script("main.py", *DEMO_CLI, "--preflight", "--json", timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("step_s", "train_images_per_s", "peak_memory_bytes", "projected_epoch_s",
                "projected_total_s", "eval_images_per_s", "checkpoint_bytes", "disk_bytes"):
        assert report[key] > 0, key
    assert report["fits"] and report["device"] == "cpu" and report["precision"] == "float32"
    assert [s["stage"] for s in report["stages"]] == [0, 1]
    assert all(s["micro_batch"] == 32 and s["accum_steps"] == 1 and s["steps_per_epoch"] == 37
               for s in report["stages"])  # 1197 train digits / 32
    assert report["disk_bytes"] > report["checkpoint_bytes"]
    assert report["projected_total_s"] > 35 * min(s["projected_epoch_s"] for s in report["stages"])
    table = run_script("main.py", *DEMO_CLI, "--preflight", timeout=HANG_S)
    assert table.returncode == 0 and "projected: the whole recipe" in table.stdout


@pytest.mark.slow
def test_preflight_halves_a_micro_batch_that_does_not_fit(monkeypatch, capsys):
    import main

    real = engine.train_step

    def small_memory(stage, images, *args):
        if images.shape[0] > 8:
            raise MemoryError("Out of memory error on GPU 0 (simulated)")
        return real(stage, images, *args)

    import preflight

    monkeypatch.setattr(engine, "train_step", small_memory)
    monkeypatch.setattr(preflight, "train_step", small_memory)
    cfg = load_config("configs/demo.yaml", ["stages.1.epochs=1"])
    with pytest.raises(UserError, match=r"a micro-batch of 32 images \(stage 0\) does not fit in "
                                        r"memory on cpu; 8 does: -o train.accum_steps=4 keeps "
                                        r"the 32 images per step, or try -o model.recompute=true"):
        main.run_preflight(cfg, as_json=True)
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(s["micro_batch"], s["accum_steps"]) for s in report["stages"]] == [(8, 4), (8, 4)]


@pytest.mark.slow
@pytest.mark.skipif(not peaks_reset(), reason="Paddle 2.6 cannot reset the allocator's peak: "
                                              "its preflight peak includes the stage check")
def test_preflight_peak_memory_leaves_out_the_stage_check(monkeypatch, capsys):
    """The peak is what the run's own steps, evaluation and checkpoint hold in Paddle's
    allocator: a 256 MiB tensor the stage check held and freed is not in it."""
    import paddle

    import main
    import preflight

    real = preflight.check_stages

    def wasteful_check(*args, **kwargs):
        held = paddle.zeros([64 * 2 ** 20], dtype="float32")
        assert held.shape == [64 * 2 ** 20]
        return real(*args, **kwargs)

    monkeypatch.setattr(preflight, "check_stages", wasteful_check)
    main.run_preflight(load_config("configs/demo.yaml", ["stages.1.epochs=1"]), as_json=True)
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < report["peak_memory_bytes"] < 64 * 2 ** 20
    assert report["peak_includes_stage_check"] is False
    assert report["peak_reserved_bytes"] is None  # a GPU's allocator alone holds more
