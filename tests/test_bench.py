"""The benchmark scripts run and print their JSON line; their timings are not asserted, the
R-Drop bench's aggregation is checked against NumPy, and a stopped bench continues."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import paddle
import pytest
from conftest import FAST_CLI, HANG_S, ROOT, assert_one_error, run_script


@pytest.mark.slow
def test_step_ratio_prints_one_json_line():
    proc = run_script("bench/step_ratio.py", "--steps", "1", "--repeats", "1", timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["host_bytes_per_image"] == 32 * 32 * 3
    assert result["rdrop_concat_over_ce"] > 0 and result["two_forwards_over_ce"] > 0
    assert set(result["step_s"]) == {"rdrop_concat", "two_forwards", "ce_only"}


@pytest.mark.slow
def test_loader_bench_prints_rates_and_the_workers_training_needs():
    proc = run_script("bench/loader.py", "--images", "32", "--list-files", "300",
                      "--gpu-images-per-s", "40", timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result["views_images_per_s"]) == {"384", "32"}
    assert result["decode_images_per_s"] > 0 and result["listing_files_per_s"] > 0
    assert set(result["loader_images_per_s"]) == {"1", "2"}
    given = [name for name in result["workers_needed"] if "given" in name]
    assert len(given) == 1 and result["training_images_per_s"][given[0]] == 40.0
    assert all(count >= 1 for count in result["workers_needed"].values())


@pytest.mark.slow
def test_memory_bench_quick_prints_one_json_line():
    proc = run_script("bench/memory.py", "--quick", timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for label in ("", "process_"):  # Paddle's allocator, and the process's peak
        plain, recomputed = (result[f"{kind}_{label}bytes_per_image"]
                             for kind in ("plain", "recompute"))
        assert plain > 0 and recomputed > 0
        assert result[f"{label}recompute_over_plain"] == pytest.approx(recomputed / plain,
                                                                        abs=1e-3)
    # The allocator's count is of the tensors: recompute keeps less of them per image.
    assert result["recompute_over_plain"] < 1


@pytest.mark.slow
def test_rdrop_effect_refuses_a_single_seed():
    proc = run_script("bench/rdrop_effect.py", "--seeds", "1")
    assert proc.returncode == 2 and "--seeds must be at least 2" in proc.stderr


@pytest.mark.slow
def test_rdrop_effect_stopped_resumes_reports_each_runs_numbers_and_reads_them_back(tmp_path):
    """Ctrl-C in the middle of the first run: one line, exit 130, the run's checkpoint kept;
    run again, the bench resumes that run (not a fresh start into its folder), trains every
    arm and reports each run's own numbers; once more, the finished runs are read back, not
    trained again; a finished run's damaged best.json is one line that says how to train it
    again."""
    out = tmp_path / "bench"
    args = [sys.executable, os.path.join(ROOT, "bench", "rdrop_effect.py"), "--alphas", "0",
            "2", "--seeds", "2", "--out", str(out), *FAST_CLI, "-o", "stages.0.epochs=6"]
    first = out / "alpha_0" / "seed_0"
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    while proc.poll() is None and not (first / "last" / "state.json").exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C does: the bench and its run
    _, err = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert f"interrupted: SIGINT while training {first}; its checkpoint is kept" in err
    stopped = json.loads((first / "last" / "state.json").read_text())["position"]
    assert stopped["stage"] == 0
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr[-2000:]
    records = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if "test" not in r]) == 7  # every epoch once, resumed
    lines = again.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert lines[0].startswith("| α | test top-1") and len(lines) == 2 + 2 + 1
    assert set(result["alphas"]) == {"0", "2"} and result["seeds"] == 2
    assert result["paddle"] == paddle.__version__ and isinstance(result["kernel_settings"], dict)
    for alpha in ("0", "2"):
        for seed in (0, 1):
            config = (out / f"alpha_{alpha}" / f"seed_{seed}" / "config.yaml").read_text()
            assert f"alpha: {float(alpha)}" in config and f"seed: {seed}" in config
        runs = [json.loads((out / f"alpha_{alpha}" / f"seed_{s}" / "best.json").read_text())
                for s in (0, 1)]
        tops = np.array([run["test_top1"] for run in runs], dtype=np.float64)
        arm = result["alphas"][alpha]["test_top1"]
        assert arm["runs"] == list(tops)
        assert arm["mean"] == pytest.approx(tops.mean(), abs=1e-12)
        assert arm["std"] == pytest.approx(tops.std(ddof=1), abs=1e-12)
    # α = 0 still measures the KL between the two passes; it is not zero.
    assert all(kl > 0 for kl in result["alphas"]["0"]["train_kl"]["runs"])
    stamp = (first / "metrics.jsonl").stat().st_mtime_ns
    read_back = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    assert read_back.returncode == 0 and read_back.stdout == again.stdout.replace(
        _wall(again.stdout), _wall(read_back.stdout))
    assert (first / "metrics.jsonl").stat().st_mtime_ns == stamp
    (first / "best.json").write_text("{damaged")
    damaged = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    assert_one_error(damaged, f"the finished run in {first} has damaged results",
                     "to train it again")


def _wall(stdout):
    """The bench's wall time in its JSON line (the one thing a read-back changes)."""
    return f'"wall_s": {json.loads(stdout.splitlines()[-1])["wall_s"]}'
