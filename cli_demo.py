"""Chat with a Qwen (v1) chat checkpoint in the terminal; replies appear as they are generated.

    python cli_demo.py -c Qwen-7B-Chat [-s SEED] [--cpu-only] [--system TEXT]
    python cli_demo.py -c demo                       # a tiny random-weight model: no download, no GPU
    python cli_demo.py -c Qwen-7B-Chat --query "Hi"  # print one reply and exit (for scripts)

In the chat, type :h for the commands (history, seed, generation settings, ...).
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from typing import Any, TextIO

from qwen.chat_turn import ChatTurn, SamplingParams, chat_turn
from qwen.engine import GenerationEngine, RequestHandle
from qwen.loading import USAGE_NOTICE, add_model_arguments, load_from_args
from qwen.qwen_generation_utils import DEFAULT_MAX_WINDOW_SIZE, DEFAULT_SYSTEM_PROMPT, HistoryType

DEFAULT_SEED = 1234  # the original cli_demo.py's default
MAX_SEED = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes
USER_PROMPT = "User> "
REPLY_PREFIX = "Qwen-Chat: "  # the original's, which scripts reading the chat may look for
# Exit statuses, as the original's: Ctrl-C at the prompt ended it with 1, and :q with 0.
EXIT_OK, EXIT_CTRL_C_AT_PROMPT = 0, 1

# The same information as the original's welcome (commands, the model's license, harmful content), in our words.
WELCOME = (
    "Welcome! You are chatting with Qwen-Chat: type a message and press Enter; :h lists the commands.\n"
    "（欢迎！这里是 Qwen-Chat 对话：输入消息后回车即可；输入 :h 查看所有命令。）\n\n" + USAGE_NOTICE + "\n"
)
HELP = """\
Commands (命令):
    :help / :h              show this help                             显示本说明
    :exit / :quit / :q      quit (Ctrl-D too)                          退出（也可按 Ctrl-D）
    :clear / :cl            clear the screen                           清空屏幕
    :clear-his / :clh       forget the conversation so far             清空对话记录
    :history / :his         show the conversation so far               查看对话记录
    :seed                   show the random seed                       查看随机种子
    :seed <N>               set the seed to N                          把随机种子设为 N
    :conf                   show the generation settings               查看生成参数
    :conf <key>=<value>     change settings, e.g. :conf top_p=0.9      修改生成参数，可一次写多组
    :reset-conf             go back to the checkpoint's settings       恢复模型自带的生成参数
Each reply is sampled from the seed, so one question and one seed give one reply. Ctrl-C while Qwen replies stops
the reply, and a stopped reply is NOT kept in the history: the next message is answered as if that question had not
been asked. Ctrl-C at the prompt quits (exit status 1). A line starting with ':' that is none of these commands
(they are case-sensitive) is sent to Qwen as a message.
（每次回复都由随机种子抽样，同一问题与同一种子得到同一回复。
回复途中按 Ctrl-C 会停止该回复，且这一轮不计入对话记录；在输入提示处按 Ctrl-C 则退出（退出码 1）。
以 ':' 开头但不是上述命令的行（命令区分大小写）会作为消息发给 Qwen。）"""
COMMANDS = ("help", "h", "exit", "quit", "q", "clear", "cl", "clear-his", "clh", "history", "his", "seed", "conf",
            "reset-conf")

# What `:conf` may change, and the type each takes. These are the fields the engine's SamplingParams honours, plus
# max_window_size, which decides how much history fits in the prompt.
EDITABLE_FIELDS: dict[str, type] = {
    "max_new_tokens": int,
    "do_sample": bool,
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "repetition_penalty": float,
    "max_window_size": int,
}
SAMPLING_FIELDS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
# C0 controls except newline and tab, DEL and C1 controls: a model's text must never drive the user's terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def terminal_safe(text: str) -> str:
    """Text with control characters (escape sequences, carriage returns, ...) shown as `\\xNN` instead of obeyed."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def one_line(text: str | None) -> str:
    """An error message as one line of plain text (an exception's message may hold newlines or escape sequences)."""
    return terminal_safe(" ".join((text or "unknown error").split()))


def parse_value(name: str, text: str) -> Any:
    """The value `text` gives field `name`, parsed as a Python literal (never evaluated); ValueError if unfit."""
    kind = EDITABLE_FIELDS[name]
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise ValueError(f"{text!r} is not a literal value") from None
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} takes True or False, not {text!r}")
        return value
    # bool is an int subclass, but `top_k=True` is a slip, not a number.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} takes a number, not {text!r}")
    if kind is int:
        if not isinstance(value, int):
            raise ValueError(f"{name} takes a whole number, not {text!r}")
        return value
    if not math.isfinite(value):
        raise ValueError(f"{name} takes a finite number, not {text!r}")
    return float(value)


class _ReplyWriter:
    """Writes streamed text stripped at both ends, as the reply is kept in the history.

    Leading whitespace is skipped, and trailing whitespace is held back until more text follows it, so what the user
    sees is exactly the stored reply even though it is written piece by piece.
    """

    def __init__(self, out: TextIO, safe: bool) -> None:
        self.out = out
        self.safe = safe
        self.started = False
        self.pending = ""

    def feed(self, text: str) -> None:
        text = self.pending + text
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        body = text.rstrip()
        self.pending = text[len(body):]
        if body:
            self.out.write(terminal_safe(body) if self.safe else body)
            self.out.flush()


@dataclass
class Reply:
    text: str  # stripped, as stored in the history
    finish_reason: str  # "stop", "length", "cancelled" or "error"
    error: str | None = None


@contextmanager
def _ctrl_c_cancels(handle: RequestHandle) -> Iterator[None]:
    """While a reply streams, Ctrl-C cancels it instead of raising KeyboardInterrupt somewhere in the loop.

    The engine then ends the request with a final "cancelled" event, so the stream loop finishes normally and the
    reply is dropped in one place. A second Ctrl-C raises KeyboardInterrupt, the way out should the engine not answer.
    """
    if threading.current_thread() is not threading.main_thread():  # signal handlers can only be set there
        yield
        return

    def on_interrupt(signum: int, frame: Any) -> None:
        if handle.cancelled.is_set():
            raise KeyboardInterrupt
        handle.cancel()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class ChatSession:
    """One conversation: its history, system prompt, seed and editable generation settings, over a shared engine."""

    def __init__(
        self,
        engine: GenerationEngine,
        tokenizer: Any,
        generation_config: Any,
        system: str = DEFAULT_SYSTEM_PROMPT,
        seed: int = DEFAULT_SEED,
        out: TextIO | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.system = system
        self.seed = seed
        self.out = out or sys.stdout
        self.history: HistoryType = []
        # Copies: `:conf` edits never reach the model's own config, and `:reset-conf` has the original to go back to.
        self.default_conf = copy.deepcopy(generation_config)
        self.conf = copy.deepcopy(generation_config)

    # Generation -------------------------------------------------------------------------------------------------------

    def sampling_params(self, conf: Any = None) -> SamplingParams:
        """The sampling settings of `conf` (else the session's) as the engine reads them, fallbacks filled in; raises
        ValueError for a value the engine rejects. Each reply takes them from its turn (`turn`)."""
        conf = self.conf if conf is None else conf
        return SamplingParams.from_generation_config(conf, seed=self.seed)

    def turn(self, query: str) -> ChatTurn:
        """The library's chat turn answering `query` after the history: the one window policy, budget and stops."""
        return chat_turn(self.tokenizer, query, self.history, self.system, self.conf, self.engine.max_context)

    def reply(self, query: str, safe: bool | None = None) -> Reply:
        """Stream the reply to `query` to `out` and, unless it was stopped or failed, add the turn to the history.

        Raises ValueError when the prompt cannot be answered (longer than the model's context).
        """
        if safe is None:
            safe = self.out.isatty()
        turn = self.turn(query)
        handle = self.engine.submit(turn.prompt_ids, turn.sampling_params(seed=self.seed))
        writer = _ReplyWriter(self.out, safe)
        text, reason, error = "", "error", None
        with _ctrl_c_cancels(handle):
            for event in handle:
                text += event.text
                writer.feed(event.text)
                if event.finish_reason is not None:
                    reason, error = event.finish_reason, event.error
        reply = Reply(text.strip(), reason, error)
        if reason in ("stop", "length"):
            self.history.append((query, reply.text))
        return reply

    # Commands ---------------------------------------------------------------------------------------------------------

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def run_command(self, name: str, words: list[str]) -> bool:
        """Carry out command `name` (one of COMMANDS) with the words after it; False means the user asked to quit."""
        if name in ("exit", "quit", "q"):
            return False
        if name in ("help", "h"):
            self.say(HELP)
        elif name in ("clear", "cl"):
            self.clear_screen()
            self.say(WELCOME)
        elif name in ("clear-his", "clh"):
            self.say(f"[INFO] History cleared ({len(self.history)} turns forgotten).")
            self.history.clear()
        elif name in ("history", "his"):
            self.show_history()
        elif name == "seed":
            self.seed_command(words)
        elif name == "conf":
            self.conf_command(words)
        elif name == "reset-conf":
            self.conf = copy.deepcopy(self.default_conf)
            self.say("[INFO] Generation settings reset to the checkpoint's.")
            self.show_conf()
        return True

    def clear_screen(self) -> None:
        if os.name == "nt":
            os.system("cls")
        elif self.out.isatty():
            self.out.write("\x1b[H\x1b[2J")  # cursor home, erase the screen
            self.out.flush()

    def show_history(self) -> None:
        """The original's layout: a title rule, `User[i]:` and `QWen[i]:` lines numbered from 0, a closing rule."""
        width = shutil.get_terminal_size().columns
        safe = self.out.isatty()
        self.say(f"History ({len(self.history)})".center(width, "="))
        for number, (query, response) in enumerate(self.history):
            if safe:
                query, response = terminal_safe(query), terminal_safe(response)
            self.say(f"User[{number}]: {query}")
            self.say(f"QWen[{number}]: {response}")
        self.say("=" * width)

    def seed_command(self, words: list[str]) -> None:
        if not words:
            self.say(f"[INFO] Random seed: {self.seed}")
            return
        try:
            seed = int(words[0])
        except ValueError:
            seed = -1
        if not 0 <= seed <= MAX_SEED:
            self.say(f"[WARNING] The seed must be a whole number from 0 to {MAX_SEED}, not {words[0]!r}; "
                     "seed unchanged.")
            return
        self.seed = seed
        self.say(f"[INFO] Random seed set to {seed}.")

    def conf_command(self, words: list[str]) -> None:
        """Apply each `key=value` pair in turn; a bad pair is reported and skipped, the others still apply."""
        if not words:
            self.show_conf()
            return
        for pair in words:
            key, equals, text = pair.partition("=")
            if not equals or not key or not text:
                self.say(f"[WARNING] {pair!r} is not key=value (e.g. :conf top_p=0.9); skipped.")
                continue
            if key not in EDITABLE_FIELDS:
                self.say(f"[WARNING] Unknown setting {key!r} (settable: {', '.join(EDITABLE_FIELDS)}); skipped.")
                continue
            try:
                value = parse_value(key, text)
                if key == "max_window_size" and value < 1:
                    raise ValueError("max_window_size must be at least 1")
                candidate = copy.deepcopy(self.conf)
                setattr(candidate, key, value)
                self.sampling_params(candidate)  # what the engine would refuse is refused here, not at the reply
            except ValueError as error:
                self.say(f"[WARNING] {key}: {str(error).rstrip('.')}; skipped.")
                continue
            self.conf = candidate
            self.say(f"[INFO] {key} = {value!r}")

    def show_conf(self) -> None:
        """The values the next reply uses (fallbacks filled in), which are not always what the config file says."""
        params = self.sampling_params()
        self.say("Generation settings (change with :conf key=value):")
        for name in SAMPLING_FIELDS:
            self.say(f"    {name} = {getattr(params, name)}")
        self.say(f"    max_window_size = {getattr(self.conf, 'max_window_size', None) or DEFAULT_MAX_WINDOW_SIZE}")
        if params.greedy:
            self.say("    (greedy: temperature, top_p and top_k have no effect)")
        else:
            self.say(f"    (sampled with seed {self.seed})")


# ----------------------------------------------------------------------------------------------------------------------
# The two ways to run
# ----------------------------------------------------------------------------------------------------------------------


def split_command(line: str) -> tuple[str, list[str]] | None:
    """(name, words after it) when `line` is a command, else None: the line is a message for the model.

    As in the original, a command is a line starting with ':' whose first word (spaces after the colon allowed) is
    one of COMMANDS, exactly; any other line, `:` alone or `:Help` included, is sent to the model as typed.
    """
    if not line.startswith(":"):
        return None
    words = line[1:].split()
    if not words or words[0] not in COMMANDS:
        return None
    return words[0], words[1:]


def enable_line_editing() -> None:
    """Arrow keys and input history for `input()`, where the platform has readline."""
    if not sys.stdin.isatty():
        return
    try:
        importlib.import_module("readline")  # importing it is what hooks it into input()
    except ImportError:  # Windows without pyreadline: plain input() still works
        pass


def chat_loop(session: ChatSession, read: Callable[[str], str] = input) -> int:
    """The interactive chat; returns the exit status."""
    enable_line_editing()
    session.say(WELCOME)
    while True:
        try:
            line = read(USER_PROMPT).strip()
        except EOFError:  # Ctrl-D, or the end of piped input: a normal end, as :q
            session.say()
            return EXIT_OK
        except KeyboardInterrupt:  # Ctrl-C at the prompt quits, as in the original
            session.say()  # so that the shell's prompt does not follow "User> ^C" on the same line
            return EXIT_CTRL_C_AT_PROMPT
        except UnicodeDecodeError as error:  # bytes the terminal's encoding cannot read (with strict decoding)
            session.say(f"[ERROR] The line could not be decoded ({error.reason}); please type it again.")
            continue
        if not line:
            session.say("[ERROR] Empty message: type some text, or :h for the commands.")
            continue
        command = split_command(line)
        if command is not None:
            if not session.run_command(*command):
                return EXIT_OK
            continue
        session.out.write("\n" + REPLY_PREFIX)
        session.out.flush()
        try:
            reply = session.reply(line)
        except ValueError as error:  # the prompt does not fit in the context
            session.say(f"\n[ERROR] {error}")
            continue
        if reply.finish_reason == "cancelled":
            session.say("\n[WARNING] Reply stopped; this turn is not added to the history.")
        elif reply.finish_reason == "error":
            session.say(f"\n[ERROR] Generation failed ({one_line(reply.error)}); this turn is not added to the "
                        "history.")
        else:
            session.say("\n")


def answer_once(session: ChatSession, query: str) -> int:
    """`--query`: the reply alone on stdout, problems on stderr."""
    try:
        reply = session.reply(query)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    session.say()
    if reply.finish_reason == "error":
        print(f"error: generation failed ({one_line(reply.error)})", file=sys.stderr)
        return 1
    if reply.finish_reason == "cancelled":
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("-s", "--seed", type=int, default=DEFAULT_SEED,
                        help=f"random seed for sampling (default {DEFAULT_SEED}); change it in the chat with :seed N")
    parser.add_argument("--system", default=DEFAULT_SYSTEM_PROMPT,
                        help=f"system prompt (default {DEFAULT_SYSTEM_PROMPT!r})")
    parser.add_argument("--query",
                        help="answer this one message and exit; stdout gets the reply alone, notices go to stderr")
    parser.add_argument("--compile", action="store_true",
                        help="decode with the torch.compile'd fixed-shape step (same tokens; the first steps at each batch size wait for a compilation, tens of seconds on a CPU)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.seed <= MAX_SEED:
        parser.error(f"--seed must be from 0 to {MAX_SEED}")
    if args.query is not None and not args.query.strip():
        parser.error("--query needs a non-empty message")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Text that the terminal's encoding cannot show becomes '?' rather than ending the chat with a traceback.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    # Every failure the engine logs also ends its reply with an "error" event, which the chat shows as one line; the
    # logged traceback would only bury the conversation.
    engine_log = logging.getLogger(GenerationEngine.__module__)
    engine_log.addHandler(logging.NullHandler())
    engine_log.propagate = False
    try:
        # stdout holds the conversation alone (with --query: the reply alone), so whatever a library prints while
        # the checkpoint loads goes to stderr with our own notices.
        with redirect_stdout(sys.stderr):
            model, tokenizer = load_from_args(args)
    except KeyboardInterrupt:
        return 130
    engine = GenerationEngine(model, tokenizer, max_batch_size=1, compile=args.compile)
    try:
        session = ChatSession(engine, tokenizer, model.generation_config, system=args.system, seed=args.seed)
        try:
            session.sampling_params()
        except ValueError as error:  # refused here, not at every reply
            print(f"error: the generation settings of {args.checkpoint_path} (generation_config.json) are unusable: "
                  f"{error}", file=sys.stderr)
            return 1
        if args.query is not None:
            return answer_once(session, args.query)
        return chat_loop(session)
    except KeyboardInterrupt:  # a second Ctrl-C during a reply
        print(flush=True)
        return 130
    finally:
        engine.close()


if __name__ == "__main__":
    sys.exit(main())
