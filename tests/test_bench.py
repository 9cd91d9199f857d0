"""The benchmark script runs and prints its JSON line (its numbers are not asserted)."""

import json

import pytest
from conftest import (
    run_script,
)


def test_step_ratio_prints_one_json_line():
    proc = run_script("bench/step_ratio.py", "--steps", "1", "--repeats", "1", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["host_bytes_per_image"] == 32 * 32 * 3
    assert result["rdrop_concat_over_ce"] > 0 and result["two_forwards_over_ce"] > 0
    assert set(result["step_s"]) == {"rdrop_concat", "two_forwards", "ce_only"}


def test_loader_bench_prints_rates_and_the_workers_training_needs():
    proc = run_script("bench/loader.py", "--images", "32", "--list-files", "300",
                      "--gpu-images-per-s", "40", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result["views_images_per_s"]) == {"384", "32"}
    assert result["decode_images_per_s"] > 0 and result["listing_files_per_s"] > 0
    assert set(result["loader_images_per_s"]) == {"1", "2"}
    given = [name for name in result["workers_needed"] if "given" in name]
    assert len(given) == 1 and result["training_images_per_s"][given[0]] == 40.0
    assert all(count >= 1 for count in result["workers_needed"].values())


def test_memory_bench_quick_prints_one_json_line():
    proc = run_script("bench/memory.py", "--quick", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["plain_bytes_per_image"] > 0 and result["recompute_bytes_per_image"] > 0
    assert result["recompute_over_plain"] == pytest.approx(
        result["recompute_bytes_per_image"] / result["plain_bytes_per_image"], abs=1e-3)
