"""The benchmark script runs and prints its JSON line (its numbers are not asserted)."""

import json

from conftest import run_script


def test_step_ratio_prints_one_json_line():
    proc = run_script("bench/step_ratio.py", "--steps", "1", "--repeats", "1", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["host_bytes_per_image"] == 32 * 32 * 3
    assert result["rdrop_concat_over_ce"] > 0 and result["two_forwards_over_ce"] > 0
    assert set(result["step_s"]) == {"rdrop_concat", "two_forwards", "ce_only"}
