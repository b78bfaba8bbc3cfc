"""One run on a GPU: the CUDA-only tests, then ours against transformers' Qwen2 at the released Qwen-7B shape.

    python bench/gpu_check.py --out DIR            # on a CUDA GPU: about 6-8 minutes on an H200
    python bench/gpu_check.py --out DIR --smoke    # tiny shapes, a few tokens: proves the script end to end (CPU too)

Writes DIR/gpu_check.json (every measured number, the environment, and each part's status: "ok", "skipped: <why>"
or "failed: <one line>") and DIR/gpu_check.md (the table the README quotes), both rewritten after every part so a
run cut short still leaves what it measured. One failing part never stops the others.

Models are random, of the released shape (`qwen.checkpoint.SIZES`: 7B for inference, 1.8B for the LoRA step), built
directly on the device in bf16 with the models' own small-std normal init: no checkpoint file. transformers'
`Qwen2ForCausalLM` gets the same weights through `qwen.convert.to_qwen2_model` (shared storage), and the logits of
both are compared before anything is timed. Timers wrap `torch.cuda.synchronize()` (on the CPU plain wall time);
each timing follows a warm-up.

Parts run in PARTS' order, the CUDA-only tests first and the compilations last; a part (or a compiled batch size)
that would start after the run's budget (420 s on the GPU) is recorded as left out, so the whole run stays near the
8 minutes a GPU session allows. Decode rate = batch * (N - 1) / (time of N new tokens - time of 1), so prefill and
set-up drop out. The roofline of
batch-1 decode is the device copy bandwidth (bytes read + written per second by a large `Tensor.copy_`) divided by
the bytes one decoded token reads from the weights (`bench_core.bytes_per_token`).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import math
import platform
import re
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import transformers  # noqa: E402
from transformers import CompileConfig  # noqa: E402

from bench_core import bytes_per_token  # noqa: E402

from qwen.checkpoint import config_for_size  # noqa: E402
from qwen.convert import to_qwen2_model  # noqa: E402
from qwen.engine import GenerationEngine, SamplingParams  # noqa: E402
from qwen.modeling_qwen import QWenLMHeadModel, kv_cache_of  # noqa: E402
from qwen.tokenization_qwen import QWenTokenizer  # noqa: E402
from qwen.vocab import find_vocab  # noqa: E402
from qwen.weight_quant import quantize_weights  # noqa: E402

# The tests of the suite that run only where CUDA is (each is skipped elsewhere). Named one by one: pytest exits
# with "not found" when one is renamed, so this list cannot silently go stale.
CUDA_TESTS = (
    "tests/test_device_map.py::test_one_gpu_holds_everything",
    "tests/test_engine.py::test_on_cuda_concurrent_requests_each_match_generate",
    "tests/test_device_map.py::test_split_across_gpus_gives_the_single_gpu_logits",
    "tests/test_finetune.py::test_fp16_lora_and_full_finetuning_train_on_a_gpu",
    "tests/test_gptq.py::test_cuda_loads_it_like_the_cpu",
    "tests/test_kv_quant.py::test_the_int8_cache_on_cuda_in_half_precision",
    "tests/test_vllm.py::test_converted_checkpoint_on_vllm_chats_like_ours",
    "tests/test_vllm.py::test_reply_stops_at_im_end",
    "tests/test_vllm.py::test_original_checkpoint_on_vllm_with_remote_code",
    "tests/test_vllm.py::test_original_wrapper_on_vllm_replies_like_our_engine_class",
)

# Import names our code, tests and demos use, looked up (never imported) to list what the GPU image lacks.
OPTIONAL_MODULES = (
    "peft", "accelerate", "tiktoken", "safetensors", "pytest", "httpx", "fastapi", "uvicorn", "sse_starlette",
    "gradio", "openai", "bitsandbytes", "optimum", "gptqmodel", "flash_attn", "deepspeed", "vllm",
)

# issue 17, must 3: what the 7B bf16 numbers are judged against.
TARGETS = {
    "decode_b1_fastest_vs_native_eager": 3.0,
    "decode_b1_roofline_fraction": 0.6,
    "prefill_vs_native": 1.0,
    "engine_32_vs_1": 10.0,
}

# Relative L2 error allowed between our logits and Qwen2's on the same bf16 weights: bf16 keeps 8 bits of mantissa
# (2**-8 = 0.004 per rounding), and the two differ in how they group matrix products (fused c_attn against q/k/v).
LOGITS_RELATIVE_TOLERANCE = 2e-2

# In this order: compiling the 7B model is the longest and least predictable step, so it comes last and a run cut
# short by its time limit still has every other part.
PARTS = ("cuda_tests", "bandwidth", "ours_vs_native", "engine", "kv_int8", "weight_int8", "weight_int4", "gptq_int4",
         "lora_step", "compiled_decode")


@dataclass(frozen=True)
class Shapes:
    size: str
    lora_size: str
    prefill_tokens: int
    prompt_tokens: int
    decode_tokens: int
    batches: tuple[int, ...]
    compiled_batches: tuple[int, ...]  # each batch size is one more compilation
    engine_requests: int
    engine_tokens: int
    lora_batch: int
    lora_seq: int
    lora_steps: int
    copy_mib: int
    repeats: int  # timed runs after the warm-up; the best counts
    cuda_tests_cap_s: float
    part_cap_s: float
    budget_s: float  # a part that would start later than this is skipped


FULL = Shapes(size="7B", lora_size="1.8B", prefill_tokens=2048, prompt_tokens=32, decode_tokens=128, batches=(1, 8),
              compiled_batches=(1, 8), engine_requests=32, engine_tokens=64, lora_batch=2, lora_seq=1024, lora_steps=3,
              copy_mib=4096, repeats=1, cuda_tests_cap_s=150, part_cap_s=150, budget_s=420)
SMOKE = Shapes(size="tiny", lora_size="tiny", prefill_tokens=32, prompt_tokens=8, decode_tokens=16, batches=(1, 2),
               compiled_batches=(1,), engine_requests=4, engine_tokens=6, lora_batch=2, lora_seq=32, lora_steps=1,
               copy_mib=16, repeats=1, cuda_tests_cap_s=120, part_cap_s=120, budget_s=300)


class PartSkipped(Exception):
    """A part that cannot run here; the message says why."""


class PartFailed(Exception):
    """A part that ran and failed, with what it measured before failing."""

    def __init__(self, message: str, measured: dict[str, Any]):
        super().__init__(message)
        self.measured = measured


@dataclass
class Context:
    shapes: Shapes
    device: torch.device
    smoke: bool
    results: dict[str, Any]
    _model: QWenLMHeadModel | None = None
    _tokenizer: QWenTokenizer | None = None
    values: dict[str, float] = field(default_factory=dict)  # numbers later parts compare against
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        """Seconds since the run began."""
        return time.perf_counter() - self.started

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def model(self) -> QWenLMHeadModel:
        """The shared bf16 model of the inference parts (built once; parts that change it build their own)."""
        if self._model is None:
            self._model = random_model(self.shapes.size, torch.bfloat16, self.device)
        return self._model

    def tokenizer(self) -> QWenTokenizer:
        if self._tokenizer is None:
            self._tokenizer = QWenTokenizer(str(find_vocab()))
        return self._tokenizer

    def reset_peak(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        """Peak device memory since `reset_peak` (None on the CPU, where the allocator keeps no such count)."""
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None


# --------------------------------------------------------------------------------------------------------------------
# Building blocks


def random_model(size: str, dtype: torch.dtype, device: torch.device, seed: int = 0,
                 **overrides: Any) -> QWenLMHeadModel:
    """A `QWenLMHeadModel` of a released shape, its weights initialised directly on `device` in `dtype`."""
    config = config_for_size(size, **overrides)
    torch.manual_seed(seed)
    with torch.device(device):
        model = QWenLMHeadModel._from_config(config, dtype=dtype)
    return model.eval()


def prompt_ids(batch: int, length: int, vocab: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab, (batch, length), generator=generator).to(device)


def timed(ctx: Context, run: Callable[[], Any]) -> float:
    ctx.sync()
    start = time.perf_counter()
    run()
    ctx.sync()
    return time.perf_counter() - start


def best_of(ctx: Context, run: Callable[[], Any], repeats: int | None = None) -> float:
    run()  # warm-up
    return min(timed(ctx, run) for _ in range(repeats or ctx.shapes.repeats))


GREEDY = dict(do_sample=False, repetition_penalty=1.0, top_p=None, top_k=None, pad_token_id=0)


def generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, **extra: Any) -> torch.Tensor:
    # min_new_tokens keeps random weights from stopping early on an end-of-text token.
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, **GREEDY, **extra)


@torch.inference_mode()
def decode_rate(ctx: Context, model: torch.nn.Module, batch: int, **extra: Any) -> float:
    """Greedy tokens/s of generate() at `batch`, prefill excluded: batch * (N - 1) / (time of N new tokens - time of
    1). An error, not a number, when the two times are too close to tell apart."""
    shapes = ctx.shapes
    ids = prompt_ids(batch, shapes.prompt_tokens, model.config.vocab_size, ctx.device)
    # A static cache is sized by the first run, so its warm-up runs the full length; eager warms up on a few tokens.
    generate(model, ids, shapes.decode_tokens if "cache_implementation" in extra else 4, **extra)
    # On a busy machine one pair of runs can come out inverted; more pairs (best of each) settle it, up to a point.
    fulls: list[float] = []
    firsts: list[float] = []
    while len(fulls) < shapes.repeats or (min(fulls) <= min(firsts) and len(fulls) < 5):
        fulls.append(timed(ctx, lambda: generate(model, ids, shapes.decode_tokens, **extra)))
        firsts.append(timed(ctx, lambda: generate(model, ids, 1, **extra)))
    full, first = min(fulls), min(firsts)
    if full <= first:
        raise RuntimeError(f"{shapes.decode_tokens} new tokens took no longer than 1 ({full:.4f} s against "
                           f"{first:.4f} s, best of {len(fulls)}): the timing is noise, not a decode rate")
    return batch * (shapes.decode_tokens - 1) / (full - first)


@torch.inference_mode()
def prefill_rate(ctx: Context, model: torch.nn.Module) -> float:
    ids = prompt_ids(1, ctx.shapes.prefill_tokens, model.config.vocab_size, ctx.device)
    return ids.numel() / best_of(ctx, lambda: model(ids, use_cache=False, logits_to_keep=1), 3 * ctx.shapes.repeats)


def compile_config(ctx: Context) -> CompileConfig:
    # CUDA graphs on the GPU; on the CPU (smoke) the plain inductor mode, which has no graphs to capture.
    return CompileConfig(fullgraph=True, mode="reduce-overhead" if ctx.cuda else "default")


def engine_throughput(engine: GenerationEngine, requests: int, prompt_tokens: int, new_tokens: int,
                      deadline_s: float, decode_only: bool = False) -> float:
    """Generated tokens per second of `requests` greedy requests submitted at once (from submission to the last
    finish, or with decode_only from the last first token to the last finish, the prefill left out)."""
    first_token: dict[int, float] = {}
    finished: dict[int, float] = {}
    produced: dict[int, int] = {}
    errors: list[str] = []
    lock = threading.Lock()
    done = threading.Event()

    def tracker(index: int) -> Callable:
        def track(event) -> None:  # on the engine thread
            now = time.perf_counter()
            with lock:
                if event.token_ids and index not in first_token:
                    first_token[index] = now
                if event.finish_reason is not None:
                    if event.error:
                        errors.append(event.error)
                    finished[index] = now
                    produced[index] = event.completion_tokens
                    if len(finished) == requests:
                        done.set()
        return track

    params = SamplingParams(max_new_tokens=new_tokens, do_sample=False)
    ids = prompt_ids(requests, prompt_tokens, engine.model.config.vocab_size, torch.device("cpu")).tolist()
    start = time.perf_counter()
    for index, prompt in enumerate(ids):
        engine.submit(prompt, params, on_event=tracker(index))
    if not done.wait(deadline_s):
        raise TimeoutError(f"{requests} engine requests did not finish within {deadline_s:.0f} s")
    if errors:
        raise RuntimeError(f"an engine request failed: {errors[0]}")
    if decode_only:
        return requests * (new_tokens - 1) / max(max(finished.values()) - max(first_token.values()), 1e-9)
    return sum(produced.values()) / (max(finished.values()) - start)


def ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours and theirs else None


# --------------------------------------------------------------------------------------------------------------------
# Parts: each returns a dict of what it measured, or raises PartSkipped / any error


def part_cuda_tests(ctx: Context) -> dict[str, Any]:
    """The suite's CUDA-only tests in a subprocess (all skipped without a GPU, which still proves they collect)."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider", "-rs",
               "--durations=0", *CUDA_TESTS]
    try:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=ctx.shapes.cuda_tests_cap_s)
    except subprocess.TimeoutExpired as expired:
        tail = (expired.stdout or b"")
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        raise TimeoutError(f"the CUDA tests ran past {ctx.shapes.cuda_tests_cap_s:.0f} s; "
                           f"last output: {tail.strip().splitlines()[-1:] or ['none']}") from None
    output = result.stdout + result.stderr
    counts = {kind: 0 for kind in ("passed", "failed", "skipped", "error")}
    summary = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?)\b", line)]
    for number, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", summary[-1] if summary else ""):
        counts[kind.rstrip("s") if kind.startswith("error") else kind] += int(number)
    measured = {"tests": list(CUDA_TESTS), "returncode": result.returncode, **counts,
                "output_tail": "\n".join(output.strip().splitlines()[-30:])}
    ran = sum(counts.values())  # parametrized tests count once per case
    if result.returncode != 0 or counts["failed"] or counts["error"] or ran < len(CUDA_TESTS):
        raise PartFailed(f"pytest exit {result.returncode}: {summary[-1].strip('= ') if summary else 'no summary'}",
                         measured)
    return measured


def part_bandwidth(ctx: Context) -> dict[str, Any]:
    elements = ctx.shapes.copy_mib * 2**20 // 2
    source = torch.ones(elements, dtype=torch.bfloat16, device=ctx.device)
    target = torch.empty_like(source)
    repeats = 10
    target.copy_(source)  # warm-up
    if ctx.cuda:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(repeats):
            target.copy_(source)
        end.record()
        torch.cuda.synchronize()
        seconds = begin.elapsed_time(end) / 1000 / repeats
    else:
        seconds = min(timed(ctx, lambda: target.copy_(source)) for _ in range(repeats))
    bandwidth = 2 * source.numel() * source.element_size() / seconds  # each byte read once and written once
    ctx.values["bandwidth"] = bandwidth
    return {"copy_mib": ctx.shapes.copy_mib, "copy_bytes_per_s": bandwidth, "copy_gb_per_s": bandwidth / 1e9}


def _roofline(ctx: Context, model: QWenLMHeadModel) -> tuple[int, float | None]:
    """(weight bytes one decoded token reads, batch-1 roofline tokens/s from the measured bandwidth)."""
    weight_bytes, _ = bytes_per_token(model)
    bandwidth = ctx.values.get("bandwidth")
    return weight_bytes, (bandwidth / weight_bytes if bandwidth else None)


def part_ours_vs_native(ctx: Context) -> dict[str, Any]:
    ours = ctx.model()
    native = to_qwen2_model(ours)  # same storage: no second copy of the weights
    vocab = ours.config.vocab_size
    with torch.inference_mode():
        ids = prompt_ids(2, 64, vocab, ctx.device)
        ours_logits, native_logits = ours(ids).logits.float(), native(ids).logits.float()
    relative = ((ours_logits - native_logits).norm() / native_logits.norm()).item()
    argmax_agreement = (ours_logits.argmax(-1) == native_logits.argmax(-1)).float().mean().item()
    measured: dict[str, Any] = {
        "logits_check": {"passed": relative <= LOGITS_RELATIVE_TOLERANCE, "relative_l2": relative,
                         "tolerance": LOGITS_RELATIVE_TOLERANCE, "argmax_agreement": argmax_agreement,
                         "dtype": "bfloat16"},
    }
    if relative > LOGITS_RELATIVE_TOLERANCE:
        raise PartFailed(f"logits differ (relative L2 {relative:.2e} > {LOGITS_RELATIVE_TOLERANCE})", measured)
    weight_bytes, roofline = _roofline(ctx, ours)
    measured.update(weight_bytes_per_token=weight_bytes, roofline_tokens_per_s=roofline)
    errors: list[str] = []
    for name, model in (("ours", ours), ("native", native)):
        ctx.reset_peak()
        rates: dict[str, Any] = {}
        measured[name] = rates
        # Each measurement on its own: one that fails (say native at batch 8) leaves the others standing.
        steps = [("prefill_tokens_per_s", lambda: prefill_rate(ctx, model))] + [
            (f"decode_b{batch}_tokens_per_s", lambda batch=batch: decode_rate(ctx, model, batch))
            for batch in ctx.shapes.batches]
        for key, measure in steps:
            try:
                rates[key] = measure()
            except Exception as error:
                errors.append(f"{name} {key}: {one_line(error)}")
        rates["peak_memory_gib"] = ctx.peak_gib()
    del native
    ours_rates, native_rates = measured["ours"], measured["native"]
    measured["prefill_ratio"] = ratio(ours_rates.get("prefill_tokens_per_s"), native_rates.get("prefill_tokens_per_s"))
    for batch in ctx.shapes.batches:
        key = f"decode_b{batch}_tokens_per_s"
        measured[f"decode_b{batch}_ratio"] = ratio(ours_rates.get(key), native_rates.get(key))
    b1 = f"decode_b{ctx.shapes.batches[0]}_tokens_per_s"
    measured["roofline_fraction_ours_eager_b1"] = ratio(ours_rates.get(b1), roofline)
    measured["roofline_fraction_native_eager_b1"] = ratio(native_rates.get(b1), roofline)
    ctx.values.update(native_b1=native_rates.get(b1) or 0.0, ours_b1=ours_rates.get(b1) or 0.0,
                      roofline=roofline or 0.0)
    if errors:
        measured["errors"] = errors
        raise PartFailed(errors[0], measured)
    return measured


def part_compiled_decode(ctx: Context) -> dict[str, Any]:
    """generate() with a static cache under torch.compile, and the engine with compile=True, batch by batch (batch 1
    first: it is what the targets judge); a step that would start past the run's budget is left out and said so."""
    shapes = ctx.shapes
    model = ctx.model()
    measured: dict[str, Any] = {"mode": compile_config(ctx).mode, "left_out": [], "errors": []}
    errors: list[str] = measured["errors"]
    max_context = shapes.prompt_tokens + shapes.decode_tokens + 8
    engine = GenerationEngine(model, ctx.tokenizer(), max_batch_size=max(shapes.compiled_batches),
                              max_context=max_context, compile=True)
    ctx.reset_peak()
    try:
        for batch in shapes.compiled_batches:
            if ctx.elapsed() > shapes.budget_s:
                measured["left_out"].append(f"batch {batch}: the run's time budget ({shapes.budget_s:.0f} s) was spent")
                continue
            # The two paths fail independently (one may not compile where the other does): each error is kept.
            try:
                start = time.perf_counter()
                measured[f"generate_static_compiled_b{batch}_tokens_per_s"] = decode_rate(
                    ctx, model, batch, cache_implementation="static", compile_config=compile_config(ctx))
                measured[f"generate_static_compiled_b{batch}_wall_s"] = time.perf_counter() - start  # with compiling
            except Exception as error:
                errors.append(f"generate() batch {batch}: {one_line(error)}")
            try:
                start = time.perf_counter()
                engine_throughput(engine, batch, shapes.prompt_tokens, shapes.decode_tokens, shapes.part_cap_s,
                                  decode_only=True)  # compiles for this batch
                measured[f"engine_compiled_b{batch}_compile_s"] = time.perf_counter() - start
                measured[f"engine_compiled_b{batch}_decode_tokens_per_s"] = engine_throughput(
                    engine, batch, shapes.prompt_tokens, shapes.decode_tokens, shapes.part_cap_s, decode_only=True)
            except Exception as error:
                errors.append(f"engine batch {batch}: {one_line(error)}")
    finally:
        engine.close()
    measured["peak_memory_gib"] = ctx.peak_gib()
    b1 = shapes.compiled_batches[0]
    candidates = {
        "generate() eager": ctx.values.get("ours_b1", 0.0),
        "generate() static cache + compile": measured.get(f"generate_static_compiled_b{b1}_tokens_per_s", 0.0),
        "engine compile=True": measured.get(f"engine_compiled_b{b1}_decode_tokens_per_s", 0.0),
    }
    fastest = max(candidates, key=candidates.get)
    measured.update(fastest_b1_path=fastest, fastest_b1_tokens_per_s=candidates[fastest],
                    fastest_b1_vs_native_eager=ratio(candidates[fastest], ctx.values.get("native_b1")),
                    fastest_b1_roofline_fraction=ratio(candidates[fastest], ctx.values.get("roofline")))
    if errors or measured["left_out"]:
        raise PartFailed((errors + measured["left_out"])[0], measured)
    return measured


def part_engine(ctx: Context) -> dict[str, Any]:
    shapes = ctx.shapes
    model = ctx.model()
    max_context = shapes.prompt_tokens + shapes.engine_tokens + 8
    engine = GenerationEngine(model, ctx.tokenizer(), max_batch_size=shapes.engine_requests, max_context=max_context)
    ctx.reset_peak()
    try:
        engine_throughput(engine, shapes.engine_requests, shapes.prompt_tokens, 4, shapes.part_cap_s)  # warm-up
        many = engine_throughput(engine, shapes.engine_requests, shapes.prompt_tokens, shapes.engine_tokens,
                                 shapes.part_cap_s)
        one = engine_throughput(engine, 1, shapes.prompt_tokens, shapes.engine_tokens, shapes.part_cap_s)
    finally:
        engine.close()
    return {"requests": shapes.engine_requests, "new_tokens_each": shapes.engine_tokens,
            "prompt_tokens": shapes.prompt_tokens, "aggregate_tokens_per_s": many, "one_request_tokens_per_s": one,
            "aggregate_vs_one": many / one, "peak_memory_gib": ctx.peak_gib()}


def part_kv_int8(ctx: Context) -> dict[str, Any]:
    """The int8 KV cache (`use_cache_quantization`) in bf16 (the shared model, switched for this part) and in fp16 (a
    model of its own: casting the shared one would round its rotary buffers for the parts after this one)."""
    measured: dict[str, Any] = {}
    for dtype in (torch.bfloat16, torch.float16):
        shared = dtype == torch.bfloat16
        model = ctx.model() if shared else random_model(ctx.shapes.size, dtype, ctx.device, use_cache_quantization=True)
        name = str(dtype).removeprefix("torch.")
        model.config.use_cache_quantization = True
        try:
            with torch.inference_mode():
                ids = prompt_ids(1, ctx.shapes.prompt_tokens, model.config.vocab_size, ctx.device)
                cache = kv_cache_of(generate(model, ids, 2, return_dict_in_generate=True))
            measured[f"{name}_cache_dtype"] = str(cache.layers[0].keys.dtype).removeprefix("torch.")
            if cache.layers[0].keys.dtype != torch.uint8:  # else the rates below would be the float cache's
                raise PartFailed(f"{name}: the cache holds {cache.layers[0].keys.dtype}, not uint8", measured)
            ctx.reset_peak()
            for batch in ctx.shapes.batches:
                measured[f"{name}_decode_b{batch}_tokens_per_s"] = decode_rate(ctx, model, batch)
            measured[f"{name}_peak_memory_gib"] = ctx.peak_gib()
        finally:
            if shared:
                model.config.use_cache_quantization = False
        del model
    return measured


def _weight_quant(ctx: Context, scheme: str) -> dict[str, Any]:
    model = random_model(ctx.shapes.size, torch.bfloat16, ctx.device, seed=1)
    summary = quantize_weights(model, scheme)
    ctx.reset_peak()
    measured: dict[str, Any] = {"kernel": summary.kernel.describe(), "quantized_bytes": summary.quantized_bytes,
                                "float_bytes": summary.float_bytes}
    for batch in ctx.shapes.batches:
        measured[f"decode_b{batch}_tokens_per_s"] = decode_rate(ctx, model, batch)
    measured["peak_memory_gib"] = ctx.peak_gib()
    weight_bytes, roofline = _roofline(ctx, model)
    b1 = measured[f"decode_b{ctx.shapes.batches[0]}_tokens_per_s"]
    measured.update(weight_bytes_per_token=weight_bytes, roofline_tokens_per_s=roofline,
                    roofline_fraction_b1=ratio(b1, roofline),
                    b1_vs_native_bf16_eager=ratio(b1, ctx.values.get("native_b1")))
    return measured


def part_weight_int8(ctx: Context) -> dict[str, Any]:
    return _weight_quant(ctx, "int8")


def part_weight_int4(ctx: Context) -> dict[str, Any]:
    return _weight_quant(ctx, "int4")


def part_gptq_int4(ctx: Context) -> dict[str, Any]:
    missing = [name for name in ("optimum", "gptqmodel") if importlib.util.find_spec(name) is None]
    if missing:
        raise PartSkipped(f"{' and '.join(missing)} not installed (GPTQ checkpoints load through them)")
    if not ctx.cuda:
        raise PartSkipped("gptqmodel's int4 kernels need a CUDA GPU")
    raise PartSkipped("a GPTQ checkpoint of the 7B shape is not built by this script (it would be a 4 GB file)")


LORA_TARGETS = {"ours": ["c_attn", "c_proj", "w1", "w2"],
                "native": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def _lora_step_rate(ctx: Context, name: str) -> dict[str, Any]:
    """One implementation's LoRA training speed: forward with labels, backward, AdamW on the adapters."""
    from peft import LoraConfig, get_peft_model

    shapes = ctx.shapes
    ctx.reset_peak()
    model = random_model(shapes.lora_size, torch.bfloat16, ctx.device)
    if name == "native":
        model = to_qwen2_model(model)
    model = get_peft_model(model.train(), LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05,
                                                     target_modules=LORA_TARGETS[name], task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = prompt_ids(shapes.lora_batch, shapes.lora_seq, model.config.vocab_size, ctx.device)
    losses: list[float] = []

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    seconds = best_of(ctx, step, repeats=shapes.lora_steps)
    if not all(math.isfinite(loss) for loss in losses):
        raise RuntimeError(f"{name}: a LoRA step gave a non-finite loss ({losses})")
    return {"tokens_per_s": ids.numel() / seconds, "step_s": seconds, "last_loss": losses[-1],
            "peak_memory_gib": ctx.peak_gib()}


def part_lora_step(ctx: Context) -> dict[str, Any]:
    if importlib.util.find_spec("peft") is None:
        raise PartSkipped("peft not installed")
    shapes = ctx.shapes
    measured: dict[str, Any] = {"size": shapes.lora_size, "batch": shapes.lora_batch, "seq": shapes.lora_seq,
                                "r": 64, "dtype": "bfloat16"}
    for name in ("ours", "native"):
        measured[name] = _lora_step_rate(ctx, name)
    measured["ratio"] = ratio(measured["ours"]["tokens_per_s"], measured["native"]["tokens_per_s"])
    return measured


PART_FUNCTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "cuda_tests": part_cuda_tests, "bandwidth": part_bandwidth, "ours_vs_native": part_ours_vs_native,
    "compiled_decode": part_compiled_decode, "engine": part_engine, "kv_int8": part_kv_int8,
    "weight_int8": part_weight_int8, "weight_int4": part_weight_int4, "gptq_int4": part_gptq_int4,
    "lora_step": part_lora_step,
}
assert set(PART_FUNCTIONS) == set(PARTS)


# --------------------------------------------------------------------------------------------------------------------
# Report


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken install counts as missing
        return False


def environment(device: torch.device) -> dict[str, Any]:
    modules = {name: _installed(name) for name in OPTIONAL_MODULES}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30
        if device.type == "cuda" else None,
        "cuda": torch.version.cuda, "modules": modules,
        "missing_modules": [name for name, present in modules.items() if not present],
    }


def targets(results: dict[str, Any]) -> dict[str, Any]:
    parts = results["parts"]

    def get(part: str, key: str) -> float | None:
        return parts.get(part, {}).get("measured", {}).get(key)

    measured = {
        "decode_b1_fastest_vs_native_eager": get("compiled_decode", "fastest_b1_vs_native_eager"),
        "decode_b1_roofline_fraction": get("compiled_decode", "fastest_b1_roofline_fraction"),
        "prefill_vs_native": get("ours_vs_native", "prefill_ratio"),
        "engine_32_vs_1": get("engine", "aggregate_vs_one"),
    }
    return {name: {"target": TARGETS[name], "measured": value, "met": None if value is None else value >= TARGETS[name]}
            for name, value in measured.items()}


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(results: dict[str, Any]) -> str:
    env, parts, shapes = results["environment"], results["parts"], results["shapes"]
    m = {name: part.get("measured", {}) for name, part in parts.items()}
    native_vs = m.get("ours_vs_native", {})
    ours, native = native_vs.get("ours", {}), native_vs.get("native", {})
    lines = [
        f"GPU check{' (smoke: tiny shapes, not a measurement)' if results['smoke'] else ''}: {env['device']}, "
        f"torch {env['torch']}, transformers {env['transformers']}, {env['date']}. Random weights of the "
        f"{shapes['size']} shape in bf16; copy bandwidth {_fmt(m.get('bandwidth', {}).get('copy_gb_per_s'), 0)} GB/s.",
        "",
        "| measure | ours | native Qwen2 | ours / native | of roofline | peak GiB (ours / native) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    peak = f"{_fmt(ours.get('peak_memory_gib'))} / {_fmt(native.get('peak_memory_gib'))}"
    lines.append(f"| prefill tok/s ({shapes['prefill_tokens']}-token prompt) | "
                 f"{_fmt(ours.get('prefill_tokens_per_s'))} | {_fmt(native.get('prefill_tokens_per_s'))} | "
                 f"{_fmt(native_vs.get('prefill_ratio'), 2)} | - | {peak} |")
    for index, batch in enumerate(shapes["batches"]):
        key = f"decode_b{batch}_tokens_per_s"
        roof = _fmt(native_vs.get("roofline_fraction_ours_eager_b1"), 2) if index == 0 else "-"
        lines.append(f"| decode tok/s, batch {batch}, eager | {_fmt(ours.get(key))} | {_fmt(native.get(key))} | "
                     f"{_fmt(native_vs.get(f'decode_b{batch}_ratio'), 2)} | {roof} | {peak} |")
    compiled = m.get("compiled_decode", {})
    b1 = shapes["batches"][0]
    for batch in shapes["compiled_batches"]:
        rate = compiled.get(f"generate_static_compiled_b{batch}_tokens_per_s")
        native_rate = native.get(f"decode_b{batch}_tokens_per_s")
        roof = _fmt(ratio(rate, native_vs.get("roofline_tokens_per_s")), 2) if batch == b1 else "-"
        lines.append(f"| decode tok/s, batch {batch}, generate() static cache + compile ({compiled.get('mode', '-')}) "
                     f"| {_fmt(rate)} | {_fmt(native_rate)} (eager) | {_fmt(ratio(rate, native_rate), 2)} | {roof} | "
                     f"{_fmt(compiled.get('peak_memory_gib'))} / - |")
        rate = compiled.get(f"engine_compiled_b{batch}_decode_tokens_per_s")
        roof = _fmt(ratio(rate, native_vs.get("roofline_tokens_per_s")), 2) if batch == b1 else "-"
        lines.append(f"| decode tok/s, batch {batch}, engine compile=True | {_fmt(rate)} | {_fmt(native_rate)} (eager) "
                     f"| {_fmt(ratio(rate, native_rate), 2)} | {roof} | - |")
    engine = m.get("engine", {})
    lines.append(f"| engine, {engine.get('requests', '-')} requests x {engine.get('new_tokens_each', '-')} tokens, "
                 f"aggregate tok/s (one request alone) | {_fmt(engine.get('aggregate_tokens_per_s'))} "
                 f"({_fmt(engine.get('one_request_tokens_per_s'))}) | - | {_fmt(engine.get('aggregate_vs_one'), 1)}x "
                 f"of one | - | {_fmt(engine.get('peak_memory_gib'))} / - |")
    kv = m.get("kv_int8", {})
    for name in ("bfloat16", "float16"):
        for batch in shapes["batches"]:
            rate = kv.get(f"{name}_decode_b{batch}_tokens_per_s")
            native_rate = native.get(f"decode_b{batch}_tokens_per_s")
            lines.append(f"| decode tok/s, batch {batch}, int8 KV cache, {name} | {_fmt(rate)} | {_fmt(native_rate)} "
                         f"(bf16) | {_fmt(ratio(rate, native_rate), 2)} | - | "
                         f"{_fmt(kv.get(f'{name}_peak_memory_gib'))} / - |")
    for scheme in ("int8", "int4"):
        quant = m.get(f"weight_{scheme}", {})
        for batch in shapes["batches"]:
            rate = quant.get(f"decode_b{batch}_tokens_per_s")
            native_rate = native.get(f"decode_b{batch}_tokens_per_s")
            roof = _fmt(quant.get("roofline_fraction_b1"), 2) if batch == b1 else "-"
            lines.append(f"| decode tok/s, batch {batch}, weight-only {scheme} | {_fmt(rate)} | {_fmt(native_rate)} "
                         f"(bf16) | {_fmt(ratio(rate, native_rate), 2)} | {roof} | "
                         f"{_fmt(quant.get('peak_memory_gib'))} / - |")
    lora = m.get("lora_step", {})
    lora_ours, lora_native = lora.get("ours", {}), lora.get("native", {})
    lines.append(f"| LoRA step tok/s ({shapes['lora_size']}, bf16, {shapes['lora_batch']}x{shapes['lora_seq']}) | "
                 f"{_fmt(lora_ours.get('tokens_per_s'))} | {_fmt(lora_native.get('tokens_per_s'))} (peft) | "
                 f"{_fmt(lora.get('ratio'), 2)} | - | {_fmt(lora_ours.get('peak_memory_gib'))} / "
                 f"{_fmt(lora_native.get('peak_memory_gib'))} |")
    lines += ["", "| target | measured | met |", "|---|---:|---|"]
    for name, target in results["targets"].items():
        lines.append(f"| {name} >= {target['target']} | {_fmt(target['measured'], 2)} | {_fmt(target['met'])} |")
    lines += ["", "| part | status | seconds |", "|---|---|---:|"]
    for name in PARTS:
        part = parts.get(name, {"status": "not run"})
        lines.append(f"| {name} | {part['status']} | {_fmt(part.get('seconds'))} |")
    missing = env["missing_modules"]
    lines += ["", f"Modules not installed here: {', '.join(missing) if missing else 'none'}."]
    return "\n".join(lines) + "\n"


def write(out: Path, results: dict[str, Any]) -> None:
    results["targets"] = targets(results)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "gpu_check.md").write_text(markdown(results), encoding="utf-8")


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and a few tokens: a run of the script itself")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    args = parser.parse_args(argv)
    chosen = args.parts.split(",")
    unknown = [name for name in chosen if name not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        parser.error("no CUDA GPU is visible: the full run needs one (use --smoke for the tiny-shape run)")
    shapes = SMOKE if args.smoke else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"smoke": args.smoke, "environment": environment(device),
                               "shapes": {**shapes.__dict__, "batches": list(shapes.batches),
                                          "compiled_batches": list(shapes.compiled_batches)},
                               "parts": {}}
    ctx = Context(shapes=shapes, device=device, smoke=args.smoke, results=results)
    write(args.out, results)
    started = ctx.started
    for name in PARTS:
        if name not in chosen:
            results["parts"][name] = {"status": "skipped: not chosen with --parts"}
            continue
        if time.perf_counter() - started > shapes.budget_s:
            results["parts"][name] = {"status": f"skipped: the run's time budget ({shapes.budget_s:.0f} s) was spent "
                                                "before this part"}
            write(args.out, results)
            continue
        print(f"[{time.perf_counter() - started:6.1f} s] {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        part: dict[str, Any]
        try:
            part = {"status": "ok", "measured": PART_FUNCTIONS[name](ctx)}
        except PartSkipped as skipped:
            part = {"status": f"skipped: {skipped}"}
        except PartFailed as failed:
            part = {"status": f"failed: {one_line(failed)}", "measured": failed.measured}
        except Exception as error:  # one part's failure must not stop the others
            part = {"status": f"failed: {one_line(error)}", "traceback": traceback.format_exc(limit=-4)}
        part["seconds"] = time.perf_counter() - start
        results["parts"][name] = part
        print(f"[{time.perf_counter() - started:6.1f} s] {name}: {part['status']} ({part['seconds']:.1f} s)",
              file=sys.stderr, flush=True)
        write(args.out, results)
    results["total_seconds"] = time.perf_counter() - started
    write(args.out, results)
    print((args.out / "gpu_check.md").read_text(encoding="utf-8"))
    return 0 if all(p["status"] == "ok" or p["status"].startswith("skipped") for p in results["parts"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
