"""Checkpoint folders that are not what they seem: hub-cache symlinks, absurd config.json values, a missing vocabulary.

Each refusal is one line naming what to fix, reached by every route a user loads by: our loader (and the scripts on
top of it), the Auto classes, and `trust_remote_code=True` with the code copied into the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from support import REPO, checkout_env

# --------------------------------------------------------------------------------------------------------------------
# install-code in the Hugging Face hub cache: snapshot files are links into blobs/ that other snapshots share
# --------------------------------------------------------------------------------------------------------------------

RELEASED_MODELING_CODE = b"# the modeling code a released snapshot ships, shared with the other snapshot\n"


def hub_cache_snapshots(root: Path, checkpoint: Path) -> tuple[Path, Path, Path]:
    """Two snapshots of one repository laid out as huggingface_hub does: every file a relative link to its blob."""
    repo = root / "models--Qwen--Qwen-tiny"
    blobs = repo / "blobs"
    blobs.mkdir(parents=True)
    files = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    files["modeling_qwen.py"] = RELEASED_MODELING_CODE
    snapshots = [repo / "snapshots" / revision for revision in ("1111", "2222")]
    for name, data in files.items():
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        for snapshot in snapshots:
            snapshot.mkdir(parents=True, exist_ok=True)
            (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("1111")
    return blobs, snapshots[0], snapshots[1]


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


LOAD_WITH_REMOTE_CODE = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert "qwen" not in sys.modules
    with torch.no_grad():
        print("LOGITS", model(torch.tensor([tokenizer.encode("Hello")])).logits.sum().item())
    """
)


def test_install_code_replaces_links_and_leaves_the_shared_blobs_alone(tmp_path, tiny_chat_dir, tiny_chat_model):
    blobs, snapshot, other = hub_cache_snapshots(tmp_path / "hub", tiny_chat_dir)
    blobs_before, other_before = digests(blobs), digests(other)

    result = subprocess.run([sys.executable, "-m", "qwen.checkpoint", "install-code", str(snapshot)],
                            capture_output=True, text=True, env=checkout_env(), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]

    assert digests(blobs) == blobs_before  # nothing was written through a link
    assert digests(other) == other_before and all(p.is_symlink() for p in other.iterdir())
    for name in ("config.json", "tokenizer_config.json", "modeling_qwen.py", "configuration_qwen.py"):
        assert (snapshot / name).is_file() and not (snapshot / name).is_symlink(), name
    assert (snapshot / "modeling_qwen.py").read_bytes() == (REPO / "qwen" / "modeling_qwen.py").read_bytes()
    assert "AutoModelForCausalLM" in json.loads((snapshot / "config.json").read_text())["auto_map"]
    assert (snapshot / "model.safetensors").is_symlink()  # files it had no reason to touch stay links
    assert not [p for p in snapshot.iterdir() if p.name.endswith(".tmp")]

    # The snapshot loads with remote code, as the weights it links to say.
    env = checkout_env(HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    result = subprocess.run([sys.executable, "-c", LOAD_WITH_REMOTE_CODE, str(snapshot)], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ids = torch.tensor([[9707]])  # "Hello"
    with torch.no_grad():
        expected = tiny_chat_model(ids).logits.sum().item()
    assert float(result.stdout.split("LOGITS")[1]) == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# Absurd config.json values
# --------------------------------------------------------------------------------------------------------------------

# (field, value, what the one-line message must say). Values within the ceilings but contradicted by the 2-layer,
# 32-wide weights are caught against the weights; the others by the ranges alone.
ABSURD_CONFIGS = [
    ("num_hidden_layers", 0, "num_hidden_layers=0 is invalid"),
    ("num_hidden_layers", -2, "num_hidden_layers=-2 is invalid"),
    ("num_hidden_layers", 5000, "num_hidden_layers=5000 is invalid"),
    ("num_hidden_layers", 500, "num_hidden_layers=500 does not match the weights"),
    ("num_hidden_layers", "2", "num_hidden_layers='2' is invalid"),
    ("num_attention_heads", 3, "num_attention_heads=3 does not divide hidden_size=32"),
    ("num_attention_heads", 0, "num_attention_heads=0 is invalid"),
    ("seq_length", 0, "seq_length=0 is invalid"),
    ("seq_length", -1, "seq_length=-1 is invalid"),
    ("hidden_size", 64, "hidden_size=64 does not match the weights"),
    ("hidden_size", 1 << 30, "hidden_size=1073741824 is invalid"),
    ("vocab_size", 1 << 40, "vocab_size=1099511627776 is invalid"),
    ("intermediate_size", 4096, "intermediate_size=4096 does not match the weights"),
]


def with_config(folder: Path, source: Path, **changes) -> Path:
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


@pytest.mark.parametrize("field, value, message", ABSURD_CONFIGS, ids=[f"{f}={v}" for f, v, _ in ABSURD_CONFIGS])
def test_absurd_config_values_are_refused_naming_the_field(tmp_path, tiny_chat_dir, field, value, message):
    from qwen.loading import CheckpointError, load_model_and_tokenizer

    folder = with_config(tmp_path / "ckpt", tiny_chat_dir, **{field: value})
    with pytest.raises(CheckpointError) as error:
        load_model_and_tokenizer(folder, cpu_only=True)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert str(error.value).startswith(f"{folder / 'config.json'}: ")
    with pytest.raises(ValueError, match=re.escape(message)):  # the Auto classes: the same message
        AutoModelForCausalLM.from_pretrained(folder)


def test_aug_2023_field_names_are_named_as_the_config_spells_them(tmp_path, tiny_chat_dir):
    from qwen.loading import CheckpointError, check_checkpoint_folder

    folder = with_config(tmp_path / "old", tiny_chat_dir, n_layer=0)
    with pytest.raises(CheckpointError, match=r"n_layer \(num_hidden_layers\)=0 is invalid"):
        check_checkpoint_folder(folder)


def test_a_config_that_is_a_json_list_is_refused(tmp_path, tiny_chat_dir):
    from qwen.loading import CheckpointError, check_checkpoint_folder

    folder = tmp_path / "list"
    shutil.copytree(tiny_chat_dir, folder)
    (folder / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(CheckpointError, match="holds a JSON list, not an object of settings"):
        check_checkpoint_folder(folder)


def test_released_configs_still_pass_and_their_weight_index_is_checked(released_dir):
    from qwen import QWenConfig
    from qwen.configuration_qwen import QWenConfigError

    for folder in sorted(released_dir.iterdir()):
        config = QWenConfig.from_pretrained(folder)
        config.check_against_weights(folder)  # an index without its shards: names only, which agree
    config = QWenConfig.from_pretrained(released_dir / "Qwen-72B")
    config.num_hidden_layers = 40
    with pytest.raises(QWenConfigError, match="num_hidden_layers=40 does not match .* which hold 80 layers"):
        config.check_against_weights(released_dir / "Qwen-72B")
    assert QWenConfig().num_hidden_layers == 32  # transformers builds default configs: the defaults are valid


SCRIPT_LOADING = textwrap.dedent("""
    import argparse
    from qwen.loading import add_model_arguments, load_from_args
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    load_from_args(parser.parse_args())
""")

REMOTE_LOADING = textwrap.dedent("""
    import sys
    from transformers import AutoModelForCausalLM
    for folder in sys.argv[1:]:
        try:
            AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
            print("LOADED", folder)
        except Exception as error:
            print("REFUSED", type(error).__name__, str(error).splitlines()[0])
    assert "qwen" not in sys.modules
""")


def test_scripts_and_remote_code_refuse_an_absurd_config_in_one_line(tmp_path, tiny_chat_dir):
    from qwen.checkpoint import install_code

    folder = with_config(tmp_path / "layers", tiny_chat_dir, num_hidden_layers=0)
    result = subprocess.run([sys.executable, "-c", SCRIPT_LOADING, "-c", str(folder)], capture_output=True, text=True,
                            env=checkout_env(), timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {folder / 'config.json'}: num_hidden_layers=0 is invalid: it must be a whole number from 1 to 1024."
    )

    remote = []
    for name, change in (("zero-layers", {"num_hidden_layers": 0}), ("more-layers", {"num_hidden_layers": 500}),
                         ("heads", {"num_attention_heads": 3}), ("seq", {"seq_length": -5})):
        remote.append(with_config(tmp_path / name, tiny_chat_dir, **change))
        install_code(remote[-1])
    env = checkout_env(HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    result = subprocess.run([sys.executable, "-c", REMOTE_LOADING, *map(str, remote)], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line.split(" ", 2)[2] for line in result.stdout.splitlines() if line.startswith("REFUSED")] == [
        "num_hidden_layers=0 is invalid: it must be a whole number from 1 to 1024.",
        f"num_hidden_layers=500 does not match the weights in {remote[1]}, which hold 2 layers.",
        "num_attention_heads=3 does not divide hidden_size=32: every head must get the same share of the width.",
        "seq_length=-5 is invalid: it must be a whole number from 1 to 16777216.",
    ]


# --------------------------------------------------------------------------------------------------------------------
# make-random
# --------------------------------------------------------------------------------------------------------------------


def test_make_random_checks_the_vocabulary_before_writing_weights(tmp_path):
    folder = tmp_path / "random"
    # pip offline, so that the first-use fetch of the vocabulary fails (tests/test_vocab.py has it succeed).
    env = checkout_env(QWEN_VOCAB_FILE=str(tmp_path / "nowhere" / "qwen.tiktoken"), PIP_NO_INDEX="1",
                       PIP_FIND_LINKS=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "qwen.checkpoint", "make-random", str(folder)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: The Qwen vocabulary file was not found at") and "python -m qwen.vocab fetch" in last
    assert not folder.exists()  # not one byte of weights
