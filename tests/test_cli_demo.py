"""cli_demo.py in a real terminal (pexpect): streamed replies equal to independent references, every command with
the original's observable behaviour (its `Qwen-Chat: ` prefix, `:his` layout, `[INFO]`/`[WARNING]`/`[ERROR]` tags,
exit statuses, unknown `:words` sent to the model), Ctrl-C during a reply and at the prompt, Ctrl-D, undecodable
input, --query for scripts, settings the engine cannot honour, a reply that fails inside the engine, and clear
one-line errors for a wrong folder or unusable generation settings."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest

from qwen.engine import GenerationEngine, SamplingParams
from qwen.loading import DEMO_NOTICE
from qwen.qwen_generation_utils import make_context
from support import (
    POISONED_WORD,
    STOP_IDS,
    greedy_reference,
    import_script,
    nan_embedding_checkpoint,
    options_hiding_their_default,
)

REPO = Path(__file__).resolve().parent.parent
CLI = REPO / "cli_demo.py"
SYSTEM = "You are a helpful assistant."
PROMPT = "User> "
REPLY = "\nQwen-Chat: "  # the original's reply prefix, after a blank line
TIMEOUT = 60
COLUMNS = 200
# Readline's mode switches (bracketed paste, meta key) that surround each prompt; replies never contain an escape
# character, since the script shows control characters as text.
READLINE_MODES = re.compile(r"\x1b\[\?\d+[hl]")
CLEAR_SCREEN = ("\x1b[2J", "\x1bc")


def env(**extra: str) -> dict[str, str]:
    # TERM fixed so that readline behaves the same wherever the tests run.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TERM": "xterm", **extra}


def spawn(folder: Path, *extra: str, environment: dict[str, str] | None = None) -> tuple[pexpect.spawn, io.StringIO]:
    """The CLI in a pseudo-terminal, and a transcript of everything it wrote to it (undecodable bytes as U+FFFD)."""
    child = pexpect.spawn(
        sys.executable, [str(CLI), "-c", str(folder), "--cpu-only", *extra], encoding="utf-8", codec_errors="replace",
        cwd=str(REPO), env=environment or env(), dimensions=(40, COLUMNS), timeout=TIMEOUT,
    )
    transcript = io.StringIO()
    child.logfile_read = transcript
    child.expect_exact(PROMPT)
    return child, transcript


def shown(text: str) -> str:
    """What a terminal receives for reply text: control characters as \\xNN escapes (written independently here)."""
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", lambda m: f"\\x{ord(m.group()):02x}", text)


def command(child: pexpect.spawn, line: str) -> str:
    """Send a line, wait for the next prompt, and return what was printed in between (echo excluded)."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    output = READLINE_MODES.sub("", child.before).replace("\r", "")
    echo, _, rest = output.partition("\n")
    assert echo == line
    return rest


def ask(child: pexpect.spawn, question: str) -> str:
    """The reply as displayed, from just after "Qwen-Chat: " to the blank line the script prints after it."""
    output = command(child, question)
    assert output.startswith(REPLY), output
    return output[len(REPLY):].rstrip()


def assert_history(output: str, turns: list[tuple[str, str]]) -> None:
    """`:his` printed `turns` in the original's layout: a title centred in a rule of "=" as wide as the terminal,
    `User[i]:` and `QWen[i]:` lines numbered from 0, and a closing rule."""
    title, _, rest = output.partition("\n")
    left, right = len(title) - len(title.lstrip("=")), len(title) - len(title.rstrip("="))
    assert len(title) == COLUMNS and title.strip("=") == f"History ({len(turns)})" and abs(left - right) <= 1, title
    lines = [line for number, (query, reply) in enumerate(turns)
             for line in (f"User[{number}]: {shown(query)}", f"QWen[{number}]: {shown(reply)}")]
    assert rest == "".join(line + "\n" for line in [*lines, "=" * COLUMNS]), output


def reference_reply(model, tokenizer, question: str, history: list[tuple[str, str]], max_new_tokens: int) -> str:
    """transformers' greedy decoding with the checkpoint's repetition penalty (1.1), stripped as chat() strips."""
    ids = make_context(tokenizer, question, history=history, system=SYSTEM)[1]
    tokens = greedy_reference(model, tokenizer, ids, max_new_tokens, repetition_penalty=1.1)
    return tokenizer.decode(tokens, skip_special_tokens=True, errors="replace").strip()


def finish(child: pexpect.spawn) -> int:
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


# The system calls that wait for a key, by machine: pselect6, select, poll, ppoll (x86_64); pselect6, ppoll (arm64).
_WAIT_FOR_INPUT_CALLS = {"x86_64": {270, 23, 7, 271}, "aarch64": {72, 73}}


def wait_for_key_wait(child: pexpect.spawn) -> None:
    """Block until the script's main thread is asleep waiting for the next key.

    CPython's readline sees a Ctrl-C only when the signal interrupts that wait: a Ctrl-C that lands while typed keys
    are still being handled is noticed at the next key. The wait is read from /proc: the main thread's kernel wait
    channel, or else the system call it is blocked in.
    """
    proc = Path(f"/proc/{child.pid}")
    calls = _WAIT_FOR_INPUT_CALLS.get(os.uname().machine, set())
    deadline = time.monotonic() + TIMEOUT
    while True:
        wchan = (proc / "wchan").read_text()
        syscall = (proc / "syscall").read_text().split()
        if "poll" in wchan or "select" in wchan or (syscall and syscall[0].isdigit() and int(syscall[0]) in calls):
            return
        assert time.monotonic() < deadline, f"the script never waited for a key (wchan {wchan!r}, {syscall[:1]})"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def poisoned_dir(tmp_path_factory, tiny_chat_dir, tokenizer) -> Path:
    """The tiny chat checkpoint with a NaN embedding for POISONED_WORD: replies to prompts holding it fail."""
    (token_id,) = tokenizer.encode(POISONED_WORD)
    return nan_embedding_checkpoint(tiny_chat_dir, tmp_path_factory.mktemp("poisoned") / "checkpoint", token_id)


def copy_with_generation(source: Path, folder: Path, **generation: object) -> Path:
    """A checkpoint folder of links to `source`'s files, with some generation_config.json fields changed."""
    folder.mkdir()
    for item in source.iterdir():
        (folder / item.name).symlink_to(item)
    config = json.loads((source / "generation_config.json").read_text())
    (folder / "generation_config.json").unlink()
    (folder / "generation_config.json").write_text(json.dumps({**config, **generation}))
    return folder


def test_chat_with_history_and_every_command(tiny_chat_dir, tiny_chat_model, tokenizer, tmp_path):
    q1, q2 = "Hello! Who are you?", "Tell me more."
    ref1 = reference_reply(tiny_chat_model, tokenizer, q1, [], 24)
    ref2 = reference_reply(tiny_chat_model, tokenizer, q2, [(q1, ref1)], 24)
    ref2_alone = reference_reply(tiny_chat_model, tokenizer, q2, [], 24)
    assert ref1 and ref2 and ref2 != ref2_alone  # so that the second turn shows whether the history was used

    child, transcript = spawn(tiny_chat_dir)
    # The welcome says what the original's said: how to chat, :h, the model's license, no harmful content.
    welcome = (":h", "license", "harmful content", "hate speech, violence, pornography, fraud", "许可协议")
    for words in welcome:
        assert words in " ".join(transcript.getvalue().split()), words
    assert command(child, "").startswith("[ERROR] Empty message")  # nothing is sent to the model
    assert command(child, ":conf do_sample=False max_new_tokens=24") == "[INFO] do_sample = False\n" \
                                                                        "[INFO] max_new_tokens = 24\n"
    assert ask(child, q1) == shown(ref1)
    assert ask(child, q2) == shown(ref2)

    assert_history(command(child, ":his"), [(q1, ref1), (q2, ref2)])
    assert command(child, ":clh") == "[INFO] History cleared (2 turns forgotten).\n"
    assert_history(command(child, ":history"), [])
    # As in the original, a line starting with ':' is a command only if its first word is one, exactly (commands are
    # case-sensitive; spaces after the colon are allowed); any other line is a message, sent to the model as typed.
    message = ":Help me"
    ref_message = reference_reply(tiny_chat_model, tokenizer, message, [], 24)
    assert ask(child, message) == shown(ref_message)
    assert_history(command(child, ": his"), [(message, ref_message)])
    command(child, ":clh")
    assert ask(child, q2) == shown(ref2_alone)

    help_text = command(child, ":h")
    for name in (":help", ":exit", ":quit", ":q", ":clear", ":cl", ":clear-his", ":clh", ":history", ":his", ":seed",
                 ":conf", ":reset-conf", "Ctrl-C", "NOT kept in the history", "Ctrl-C at the prompt quits"):
        assert name in help_text
    assert command(child, ":help") == help_text

    assert command(child, ":seed") == "[INFO] Random seed: 1234\n"
    assert command(child, ":seed 7") == "[INFO] Random seed set to 7.\n"
    assert command(child, ":seed") == "[INFO] Random seed: 7\n"
    for bad in ("seven", "-1", str(2**64)):
        assert command(child, f":seed {bad}").startswith("[WARNING]")
    assert command(child, ":seed 8 9") == "[INFO] Random seed set to 8.\n"  # the first word, as the original took

    conf = command(child, ":conf")
    assert "do_sample = False" in conf and "max_new_tokens = 24" in conf and "top_p = 0.8" in conf
    assert command(child, ":conf top_p=0.5") == "[INFO] top_p = 0.5\n"
    assert "top_p = 0.5" in command(child, ":conf")

    marker = tmp_path / "evaluated"
    for bad in ("nonsense=1", "temperature=__import__('os')", f"temperature=open('{marker}','w')", "top_p=2",
                "top_k=1.5", "max_new_tokens=0", "do_sample=true", "do_sample=maybe", "top_p", "top_p=", "=2"):
        output = command(child, f":conf {bad}")
        assert output.startswith("[WARNING]") and output.count("\n") == 1, (bad, output)
    assert not marker.exists()
    # Each pair on its own, as in the original: a bad one is skipped, the others apply.
    output = command(child, ":conf top_p=2 temperature=0.5 top_k")
    lines = output.splitlines()
    assert lines[0].startswith("[WARNING] top_p") and lines[1] == "[INFO] temperature = 0.5", output
    assert lines[2].startswith("[WARNING]") and len(lines) == 3, output
    conf = command(child, ":conf")
    assert "top_p = 0.5" in conf and "temperature = 0.5" in conf and "max_new_tokens = 24" in conf

    output = command(child, ":reset-conf")  # says so, and shows the settings it went back to
    assert output.startswith("[INFO]")
    assert "do_sample = True" in output and "max_new_tokens = 512" in output and "top_p = 0.8" in output
    assert command(child, ":conf") == output.partition("\n")[2]

    # Replies were written piece by piece into the scrollback: nothing so far cleared the screen.
    assert not any(code in transcript.getvalue() for code in CLEAR_SCREEN)
    output = command(child, ":cl")  # clears the screen and shows the welcome again, as the original's did
    assert output.startswith("\x1b[H\x1b[2J") and all(words in " ".join(output.split()) for words in welcome)

    child.sendline(":q")
    assert finish(child) == 0


def test_ctrl_c_stops_a_reply_and_at_the_prompt_quits(tiny_chat_dir, tiny_chat_model, tokenizer):
    child, transcript = spawn(tiny_chat_dir)
    # What :h promises about Ctrl-C, each checked below.
    help_text = " ".join(command(child, ":h").split())
    assert "Ctrl-C while Qwen replies stops the reply" in help_text
    assert "Ctrl-C at the prompt quits (exit status 1)" in help_text
    # Sampled from the random model's flat distribution, 2000 tokens take far longer than the test waits.
    command(child, ":conf max_new_tokens=2000")
    child.sendline("Tell me a very long story.")
    child.expect_exact(REPLY)
    child.expect(r"\S")  # the reply is streaming: some of it is on screen before it ends
    child.sendintr()  # during a reply: the reply stops, the chat goes on (the original too)
    child.expect_exact("[WARNING] Reply stopped")
    child.expect_exact(PROMPT)
    assert_history(command(child, ":his"), [])  # the stopped turn was dropped

    command(child, ":conf do_sample=False max_new_tokens=8")
    assert ask(child, "hi") == shown(reference_reply(tiny_chat_model, tokenizer, "hi", [], 8))

    child.send("half a line")
    child.expect_exact("half a line")  # echoed: every key was read
    wait_for_key_wait(child)  # ... and handled, as a person's Ctrl-C comes after the typing
    child.sendintr()  # at the prompt: the original's way out, with its exit status
    assert finish(child) == 1
    assert "Traceback" not in transcript.getvalue()
    assert not any(code in transcript.getvalue() for code in CLEAR_SCREEN)


def test_extreme_settings_bad_input_and_a_failed_reply_leave_the_chat_working(poisoned_dir, tiny_chat_model,
                                                                              tokenizer):
    # Strict decoding of the terminal's input, as under a UTF-8 locale such as en_US.UTF-8 (C.UTF-8 escapes instead).
    child, transcript = spawn(poisoned_dir, environment=env(PYTHONIOENCODING="utf-8:strict"))
    # Bytes that never occur in UTF-8 (readline passes them on; a lone lead byte it would swallow with the next key).
    os.write(child.child_fd, b"ab\xff\xfecd\r")
    child.expect_exact(PROMPT)
    assert "[ERROR] The line could not be decoded" in child.before and child.before.count("\n") == 2, child.before

    assert command(child, ":conf temperature=1e-45 max_new_tokens=8").count("[INFO]") == 2
    conf = command(child, ":conf")
    assert "temperature = 1e-45" in conf and "(greedy" in conf
    # Logits divided by 1e-45 overflow; so small a temperature decodes greedily instead.
    reply = reference_reply(tiny_chat_model, tokenizer, "hi", [], 8)
    assert ask(child, "hi") == shown(reply)

    # A value the engine refuses is refused at :conf, in one line, and nothing changes.
    output = command(child, ":conf repetition_penalty=1e-300")
    assert output.startswith("[WARNING] repetition_penalty") and output.count("\n") == 1, output
    assert command(child, ":conf") == conf

    # Sampled again, a prompt holding the poisoned token fails inside the engine: one line, and the chat goes on.
    command(child, ":conf temperature=1.0")
    question = f"Is this{POISONED_WORD} one?"
    output = command(child, question)
    assert output.startswith(REPLY + "\n[ERROR] Generation failed (") and output.count("\n") == 3, output
    assert "this turn is not added to the history" in output
    assert_history(command(child, ":his"), [("hi", reply)])
    command(child, ":conf temperature=0")
    follow_up = reference_reply(tiny_chat_model, tokenizer, "Tell me more.", [("hi", reply)], 8)
    assert ask(child, "Tell me more.") == shown(follow_up)
    assert "Traceback" not in transcript.getvalue()
    child.sendeof()  # Ctrl-D: a normal end (the original ended with an EOFError traceback)
    assert finish(child) == 0


def test_query_prints_one_reply_and_exits(tiny_chat_dir, tiny_chat_model, tokenizer, tmp_path, vocab_file):
    # The checkpoint's generation_config.json decides the settings; a short max_new_tokens keeps sampling quick.
    folder = copy_with_generation(tiny_chat_dir, tmp_path / "short-replies", max_new_tokens=12)
    system = "You are a pirate."

    # `-c demo` (the folder QWEN_DEMO_CHECKPOINT names) prints a notice about its random weights: not on stdout.
    result = subprocess.run(
        [sys.executable, str(CLI), "-c", "demo", "--cpu-only", "-s", "5", "--system", system,
         "--query", "Where is the treasure?"],
        cwd=REPO, env={**env(), "QWEN_DEMO_CHECKPOINT": str(folder), "QWEN_VOCAB_FILE": str(vocab_file)},
        capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    assert DEMO_NOTICE in result.stderr

    # The same request straight to the engine: sampled with top_p 0.8 and seed 5, as the config and -s say.
    ids = make_context(tokenizer, "Where is the treasure?", system=system)[1]
    params = SamplingParams(max_new_tokens=12, do_sample=True, top_p=0.8, repetition_penalty=1.1, seed=5,
                            stop_token_ids=STOP_IDS)
    engine = GenerationEngine(tiny_chat_model, tokenizer, max_batch_size=1)
    try:
        expected = "".join(event.text for event in engine.submit(ids, params)).strip()
    finally:
        engine.close()
    assert expected
    assert result.stdout == expected + "\n"  # the reply alone: no banner, no prompt


def test_a_missing_folder_is_a_one_line_error(tmp_path):
    result = subprocess.run(
        [sys.executable, str(CLI), "-c", str(tmp_path / "no-such-checkpoint"), "--cpu-only"],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error:") and "no-such-checkpoint" in errors[0]
    assert result.stdout == ""



def test_unusable_generation_settings_are_refused_at_start(tiny_chat_dir, tmp_path):
    folder = copy_with_generation(tiny_chat_dir, tmp_path / "absurd", repetition_penalty=1e-300)
    result = subprocess.run(
        [sys.executable, str(CLI), "-c", str(folder), "--cpu-only"], stdin=subprocess.DEVNULL,
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert result.returncode == 1
    # (transformers' progress bar of the weights' loading comes before it)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "repetition_penalty" in errors[0] and "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""


def test_the_originals_options_and_defaults_and_every_default_shown():
    parser = import_script(CLI).build_parser()
    assert options_hiding_their_default(parser) == []
    args = parser.parse_args([])
    assert (args.checkpoint_path, args.seed, args.cpu_only) == ("Qwen/Qwen-7B-Chat", 1234, False)
    args = parser.parse_args(["-c", "x", "-s", "5", "--cpu-only"])
    assert (args.checkpoint_path, args.seed, args.cpu_only) == ("x", 5, True)
    assert parser.parse_args(["--checkpoint-path", "y", "--seed", "6"]).seed == 6


def test_an_error_message_is_one_safe_line():
    one_line = import_script(CLI).one_line
    assert one_line("out of memory.\nTried to allocate 2 GiB\x1b[2J") == "out of memory. Tried to allocate 2 GiB\\x1b[2J"
    assert one_line(None) == "unknown error"
