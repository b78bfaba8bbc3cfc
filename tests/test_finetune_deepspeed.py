"""DeepSpeed ZeRO-2 and ZeRO-3 fine-tuning through the shipped launchers, for real, with two ranks on the CPU.

`finetune/finetune_ds.sh` (full) and `finetune/finetune_lora_ds.sh` (LoRA) start `torchrun --nproc_per_node 2` with
the shipped `finetune/ds_config_zero{2,3}.json`, unchanged, on a tiny checkpoint; DeepSpeed talks gloo between the
ranks. This exercises ZeRO's sharding logic on CPU/gloo (optimizer state, gradients and, under ZeRO-3, parameters
split over the ranks, the collectives between them, the global gradient norm, the gathered 16-bit save), not
DeepSpeed's CUDA kernels or NCCL.

Each two-rank run must log, step by step, the losses and gradient norms of one process training on the same global
batch. The reference runs go through the same launchers with one rank and the ZeRO-2 config: with a single rank ZeRO
partitions nothing, and only a DeepSpeed run has the configs' optimizer and WarmupDecayLR schedule, which the Trainer's
own cannot reproduce. The full reference takes both samples as one batch of 2, the LoRA one as 2 accumulated batches
of 1, so that both ways of building the global batch are held to the two-rank result.

The configs ask for torch's AdamW (`torch_adam`), so DeepSpeed compiles no optimizer; it still JIT-compiles
`deepspeed_shm_comm` (about 40 s) the first time on a machine, cached in TORCH_EXTENSIONS_DIR (by default
~/.cache/torch_extensions), so only the first run pays, and the timeouts allow for it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from support import free_port

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                       reason="deepspeed is not installed (pip install -r requirements-finetune.txt)"),
]

# Two samples of different lengths: the ranks see different data, and their target counts differ, so a loss
# averaged per rank instead of per target token would not match the one-process run.
SAMPLES = [
    ("who", "Who are you?", "I am a tiny test model."),
    ("sky", "What colour is the sky on a clear day?", "Blue."),
]
PROMPT = f"<|im_start|>user\n{SAMPLES[0][1]}<|im_end|>\n<|im_start|>assistant\n{SAMPLES[0][2]}<|im_end|>"
STEPS = 6  # WarmupDecayLR spends steps 1 and 2 at learning rate 0, so only steps 4 to 6 show trained losses.
# Whatever DeepSpeed compiles on the first run on a machine (see the module docstring) happens inside one launch.
LAUNCH_TIMEOUT = 1200

# Same math, different order of float32 sums: gloo's reductions of per-rank gradients against one batched backward,
# batched against one-row matmuls. Measured here: losses and gradient norms agree to 1e-7 relative; 1e-5 leaves room
# for other CPUs. The faults met while writing this test were far above it: the loss of a rank averaged over that
# rank's tokens only and then scaled by the world size (100%), LoRA weights drawn from differently seeded
# generators (2e-3 from step 4).
LOG_RTOL = 1e-5
# Saved models against the reference, as a fraction of how far training moved them from the base. Adam turns those
# float differences into weight differences of up to 0.12% (measured here, on tensors whose gradients are nearly
# zero, where Adam's normalisation magnifies noise); the logits differ by 3e-6 of their movement. A lost or stale
# shard, or a missing update, would be off by about 100%.
WEIGHTS_MOVED_FRACTION = 0.02
LOGITS_MOVED_FRACTION = 1e-3

COMMON_FLAGS = (
    "--use_cpu", "--bf16", "False",  # fp32 keeps the comparison tight; bf16 would round each run differently
    "--max_steps", str(STEPS), "--warmup_ratio", "0", "--save_strategy", "no", "--seed", "42",
)
MODE_FLAGS = {
    "full": ("--learning_rate", "1e-3"),
    # Dropout draws different masks in each process, so one process and two ranks could not agree with it on.
    "lora": ("--learning_rate", "1e-2", "--lora_r", "8", "--lora_dropout", "0"),
}
LAUNCHERS = {"full": "finetune_ds.sh", "lora": "finetune_lora_ds.sh"}
TWO_RANKS = ("--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1")
ONE_PROCESS = {
    "full": ("--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1"),
    "lora": ("--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2"),
}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ds-data") / "data.json"
    path.write_text(json.dumps([
        {"id": name, "conversations": [{"from": "user", "value": question}, {"from": "assistant", "value": answer}]}
        for name, question, answer in SAMPLES
    ]))
    return path


def launch(mode: str, stage: int, ranks: int, base: Path, data: Path, output: Path, *flags: str) -> Path:
    """Run a shipped launcher as a user would; return the output folder."""
    env = {
        **os.environ, "GPUS_PER_NODE": str(ranks), "NNODES": "1", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()), "HF_HUB_OFFLINE": "1",
        # The launchers call `torchrun` and `python` from PATH: make them this interpreter's.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    command = [
        "sh", str(REPO / "finetune" / LAUNCHERS[mode]), "-m", str(base), "-d", str(data), "-o", str(output),
        "--deepspeed", str(REPO / "finetune" / f"ds_config_zero{stage}.json"), "--", *COMMON_FLAGS, *MODE_FLAGS[mode],
        *flags,
    ]
    log = output.with_suffix(".log")
    with log.open("w") as out:
        result = subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                timeout=LAUNCH_TIMEOUT)
    assert result.returncode == 0, log.read_text()[-6000:]
    return output


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_chat_dir, data_file) -> Callable[[str, int | None], Path]:
    """`run(mode, stage)`: the two-rank run of that ZeRO stage, or with stage None the one-process reference; each
    trains once per module, whichever tests ask for it."""
    done: dict[tuple[str, int | None], Path | AssertionError] = {}

    def get(mode: str, stage: int | None) -> Path:
        if (mode, stage) not in done:
            root = tmp_path_factory.mktemp(f"ds-{mode}-{stage or 'reference'}")
            try:
                if stage is None:
                    done[mode, stage] = launch(mode, 2, 1, tiny_chat_dir, data_file, root / "out", *ONE_PROCESS[mode])
                else:
                    done[mode, stage] = launch(mode, stage, 2, tiny_chat_dir, data_file, root / "out", *TWO_RANKS)
            except AssertionError as failure:  # kept, so that the next test asking for it fails without a rerun
                done[mode, stage] = failure
        result = done[mode, stage]
        if isinstance(result, AssertionError):
            raise result
        return result

    return get


def logged_steps(output: Path) -> list[dict]:
    """The Trainer's per-step log (--logging_steps 1, set by the launchers), from trainer_state.json."""
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    return [entry for entry in history if "loss" in entry]


RELOAD = r"""
import json, sys, traceback
import torch
import qwen  # registers the Qwen classes for AutoPeftModelForCausalLM
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer
from qwen.loading import load_model_and_tokenizer

request = json.loads(sys.argv[1])
results = {}
for name, (kind, folder) in request["folders"].items():
    try:
        if kind == "adapter":
            model = AutoPeftModelForCausalLM.from_pretrained(folder).eval()
            weights = {k: v for k, v in model.state_dict().items() if "lora_" in k}
            tokenizer = AutoTokenizer.from_pretrained(folder)  # the adapter folder carries the tokenizer
        else:
            model, tokenizer = load_model_and_tokenizer(folder, cpu_only=True)
            weights = model.state_dict()
        ids = torch.tensor([tokenizer.encode(request["prompt"])])
        with torch.no_grad():
            results[name] = {"logits": model(ids).logits[0], "weights": {k: v.clone() for k, v in weights.items()}}
    except Exception:
        results[name] = {"error": traceback.format_exc()}
torch.save(results, request["out"])
"""


@pytest.fixture(scope="module")
def reloaded(run, tiny_chat_dir, tmp_path_factory) -> dict[str, dict]:
    """Every saved folder loaded in one new Python process (not the training processes, and one start-up for all):
    our loader for complete folders, peft's AutoPeftModelForCausalLM for adapters. For each: its logits on PROMPT
    and its weights (the LoRA weights only, for an adapter), or the error that stopped its run or its loading, so
    that one broken run fails its own tests only."""
    folders, failed = {"base": ("model", tiny_chat_dir)}, {}
    for stage in (2, 3, None):
        label = f"zero{stage}" if stage else "reference"
        for mode, kind in (("full", "model"), ("lora", "adapter")):
            try:
                folders[f"{mode}-{label}"] = (kind, run(mode, stage))
            except AssertionError as failure:
                failed[f"{mode}-{label}"] = {"error": f"the run failed:\n{failure}"}
    out = tmp_path_factory.mktemp("ds-reloaded") / "reloaded.pt"
    request = {"folders": {name: (kind, str(folder)) for name, (kind, folder) in folders.items()},
               "prompt": PROMPT, "out": str(out)}
    result = subprocess.run([sys.executable, "-c", RELOAD, json.dumps(request)], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return {**torch.load(out), **failed}


def loaded(reloaded: dict[str, dict], name: str) -> dict:
    assert "error" not in reloaded[name], f"{name}: {reloaded[name]['error'][-4000:]}"
    return reloaded[name]


def assert_close_relative_to_training(run: torch.Tensor, reference: torch.Tensor, start: torch.Tensor, what: str,
                                      fraction: float) -> None:
    moved = (reference - start).abs().max().item()
    assert moved > 0, f"{what}: training did not change it"
    off = (run - reference).abs().max().item()
    assert off <= fraction * moved, f"{what}: off by {off:.3g}, {off / moved:.2%} of the {moved:.3g} it moved"


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_log_the_losses_of_one_process_with_the_same_global_batch(run, mode, stage):
    two_ranks, one_process = logged_steps(run(mode, stage)), logged_steps(run(mode, None))
    assert [e["step"] for e in two_ranks] == [e["step"] for e in one_process] == list(range(1, STEPS + 1))
    # With one sample per rank, only both ranks together hold the global batch of 2 samples: a rank left out, or
    # both given the same sample, changes the loss from step 1.
    for field in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor([e[field] for e in two_ranks], dtype=torch.float64),
                                   torch.tensor([e[field] for e in one_process], dtype=torch.float64),
                                   rtol=LOG_RTOL, atol=0, msg=lambda m, field=field: f"{field} per step: {m}")
    losses = [e["loss"] for e in two_ranks]
    assert losses[-1] < losses[0] - 0.05, f"training hardly moved the loss: {losses}"
    if mode == "full":  # the clipping threshold (1.0) is crossed, so the global norm over the shards is in play
        assert one_process[0]["grad_norm"] > 1.0


@pytest.mark.parametrize("stage", [2, 3])
def test_full_run_saves_a_complete_checkpoint_with_the_trained_weights(run, reloaded, stage):
    """ZeRO-3 gathers its partitions into one 16-bit save (`stage3_gather_16bit_weights_on_model_save`); ZeRO-2
    saves rank 0's replica. Either way the folder must load like a released one and hold the trained model."""
    output = run("full", stage)
    for name in ("config.json", "generation_config.json", "qwen.tiktoken", "tokenizer_config.json",
                 "model.safetensors"):
        assert (output / name).is_file(), name
    base, want = loaded(reloaded, "base"), loaded(reloaded, "full-reference")
    got = loaded(reloaded, f"full-zero{stage}")
    assert got["weights"].keys() == want["weights"].keys() == base["weights"].keys()
    for name, tensor in got["weights"].items():
        assert tensor.shape == want["weights"][name].shape, name
        assert_close_relative_to_training(tensor, want["weights"][name], base["weights"][name], name,
                                          WEIGHTS_MOVED_FRACTION)
    assert_close_relative_to_training(got["logits"], want["logits"], base["logits"], "logits", LOGITS_MOVED_FRACTION)


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_run_saves_an_adapter_that_peft_reloads(run, reloaded, tiny_chat_dir, stage):
    output = run("lora", stage)
    assert (output / "adapter_config.json").is_file() and (output / "adapter_model.safetensors").is_file()
    assert not (output / "model.safetensors").exists()
    assert json.loads((output / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_chat_dir)
    base, want = loaded(reloaded, "base"), loaded(reloaded, "lora-reference")
    got = loaded(reloaded, f"lora-zero{stage}")
    assert got["weights"].keys() == want["weights"].keys() and got["weights"]
    assert all(tensor.shape == want["weights"][name].shape for name, tensor in got["weights"].items())
    lora_b = [tensor for name, tensor in got["weights"].items() if "lora_B" in name]
    assert lora_b and all(tensor.abs().sum() > 0 for tensor in lora_b), "lora_B starts at zero: it was not trained"
    # lora_B starts at zero, so at the start the adapted model's logits are the base's: their distance from the base
    # is what training did.
    assert_close_relative_to_training(got["logits"], want["logits"], base["logits"], "logits", LOGITS_MOVED_FRACTION)
