"""bench/gpu_check.py, the one script a GPU session runs, end to end on tiny shapes (`--smoke`), so it is never
found broken when a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Every part the script has, and what each must report where it measured something. A part that disappears, or a
# number that stops being recorded, fails here.
EXPECTED_PARTS = ("cuda_tests", "bandwidth", "ours_vs_native", "engine", "kv_int8", "weight_int8", "weight_int4",
                  "gptq_int4", "lora_step", "compiled_decode")
RATES = {
    "bandwidth": ["copy_bytes_per_s"],
    "ours_vs_native": ["ours.prefill_tokens_per_s", "native.prefill_tokens_per_s", "ours.decode_b1_tokens_per_s",
                       "native.decode_b1_tokens_per_s", "ours.decode_b2_tokens_per_s", "native.decode_b2_tokens_per_s",
                       "weight_bytes_per_token", "roofline_tokens_per_s", "prefill_ratio", "decode_b1_ratio"],
    "engine": ["aggregate_tokens_per_s", "one_request_tokens_per_s", "aggregate_vs_one"],
    "kv_int8": ["bfloat16_decode_b1_tokens_per_s", "bfloat16_decode_b2_tokens_per_s", "float16_decode_b1_tokens_per_s",
                "float16_decode_b2_tokens_per_s"],
    "weight_int8": ["decode_b1_tokens_per_s", "decode_b2_tokens_per_s", "quantized_bytes", "roofline_fraction_b1"],
    "weight_int4": ["decode_b1_tokens_per_s", "decode_b2_tokens_per_s", "quantized_bytes", "roofline_fraction_b1"],
    "lora_step": ["ours.tokens_per_s", "native.tokens_per_s", "ratio"],
    "compiled_decode": ["generate_static_compiled_b1_tokens_per_s", "engine_compiled_b1_decode_tokens_per_s",
                        "fastest_b1_tokens_per_s", "fastest_b1_vs_native_eager", "fastest_b1_roofline_fraction"],
}


def _value(measured: dict, dotted: str):
    for key in dotted.split("."):
        measured = measured[key]
    return measured


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, str]:
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--smoke", "--out", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    report = json.loads((out / "gpu_check.json").read_text(encoding="utf-8"))
    return result, report, (out / "gpu_check.md").read_text(encoding="utf-8")


def test_every_part_runs_and_reports_positive_numbers(smoke_run):
    result, report, _ = smoke_run
    parts = report["parts"]
    assert tuple(parts) == EXPECTED_PARTS
    failed = {name: part["status"] for name, part in parts.items() if part["status"].startswith("failed")}
    assert not failed, f"{failed}\n{result.stderr[-3000:]}"
    for name, part in parts.items():
        assert part["status"] == "ok" or part["status"].startswith("skipped: "), (name, part["status"])
        assert part["seconds"] >= 0
    # Only GPTQ may be skipped on the CPU (its kernels need CUDA); everything else ran.
    assert [name for name, part in parts.items() if part["status"] != "ok"] == (
        [] if torch.cuda.is_available() else ["gptq_int4"])
    for name, keys in RATES.items():
        for key in keys:
            value = _value(parts[name]["measured"], key)
            assert isinstance(value, (int, float)) and value > 0, (name, key, value)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_logits_agree_before_anything_is_timed(smoke_run):
    _, report, _ = smoke_run
    check = report["parts"]["ours_vs_native"]["measured"]["logits_check"]
    assert check["passed"] is True and 0 <= check["relative_l2"] <= check["tolerance"]


def test_the_int8_kv_cache_was_the_one_timed(smoke_run):
    _, report, _ = smoke_run
    measured = report["parts"]["kv_int8"]["measured"]
    assert measured["bfloat16_cache_dtype"] == measured["float16_cache_dtype"] == "uint8"


def test_the_cuda_only_tests_were_run(smoke_run):
    _, report, _ = smoke_run
    measured = report["parts"]["cuda_tests"]["measured"]
    assert measured["returncode"] == 0 and measured["failed"] == measured["error"] == 0
    ran = measured["passed"] + measured["skipped"]
    assert ran >= len(measured["tests"]) >= 9
    if not torch.cuda.is_available():
        assert measured["skipped"] == ran  # without a GPU every one of them is skipped, none silently passes


def test_environment_targets_and_the_table(smoke_run):
    _, report, table = smoke_run
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["transformers"] and env["date"]
    assert set(env["modules"]) >= {"peft", "fastapi", "gptqmodel", "bitsandbytes"}
    assert env["missing_modules"] == [name for name, present in env["modules"].items() if not present]
    assert set(report["targets"]) == {"decode_b1_fastest_vs_native_eager", "decode_b1_roofline_fraction",
                                      "prefill_vs_native", "engine_32_vs_1"}
    for target in report["targets"].values():
        assert target["measured"] > 0 and target["met"] in (True, False)
    assert "| prefill tok/s" in table and "| decode tok/s, batch 1, eager |" in table
    assert "| LoRA step tok/s" in table and "weight-only int4" in table and "int8 KV cache, float16" in table
    for name in EXPECTED_PARTS:
        assert f"| {name} | {report['parts'][name]['status']} |" in table
