"""A ReAct agent loop with two real local tools: a calculator and a file search.

    python examples/react_demo.py -c Qwen-7B-Chat --query "What is 17% of 2350?"
    python examples/react_demo.py -c Qwen-7B-Chat --root ~/notes --query "Which of my notes mention tiktoken?"
    python examples/react_demo.py -c demo --query "2+2?"   # a random-weight model: runs the loop, answers noise

Each step builds the ChatML prompt with the tools (the same `qwen.react` code the OpenAI-compatible server uses, so
the model sees exactly the transcript it was trained on), generates until the model stops at `Observation:`, reads
the `Action` / `Action Input` lines back, runs the tool here, and writes its result back as the observation. The loop
ends at a `Final Answer`, or after `--max-steps` model calls.

The tools are safe to hand to a model: the calculator parses arithmetic with `ast` and never evaluates code, and the
file search only reads below the `--root` folder it was given.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import operator
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Literal

from qwen import react
from qwen.chat_turn import SamplingParams, messages_turn
from qwen.engine import GenerationEngine
from qwen.loading import add_model_arguments, load_from_args

# --------------------------------------------------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------------------------------------------------


class ToolError(ValueError):
    """A tool refused its input; the message goes back to the model as the observation."""


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its name, what it is for, a JSON schema of its arguments, and the code."""

    name: str
    description: str
    parameters: dict[str, Any]
    run: Callable[..., Any]

    def spec(self) -> dict[str, Any]:
        """The OpenAI function spec that `qwen.react` writes into the prompt."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


# The calculator ------------------------------------------------------------------------------------------------------

MAX_EXPRESSION_LENGTH = 500
# Integers past this many bits are refused: `9**9**9` would otherwise keep the CPU busy for minutes and the result
# would be useless to the model anyway.
MAX_INTEGER_BITS = 4096

_BINARY_OPERATORS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY_OPERATORS: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression: numbers, + - * / // % **, unary signs and parentheses; nothing else.

    The text is parsed with `ast` and only those nodes are evaluated, so names, calls, attributes and strings
    (`__import__('os')`, `open(...)`) are refused with a ToolError before anything runs.
    """
    if not isinstance(expression, str):
        raise ToolError(f"the expression must be a string, got {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION_LENGTH:
        raise ToolError(f"the expression is longer than {MAX_EXPRESSION_LENGTH} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as error:
        raise ToolError(f"{expression!r} is not an arithmetic expression ({error.msg})") from None
    try:
        return _evaluate(tree.body)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except OverflowError:
        raise ToolError("the result is too large for a float") from None
    except RecursionError:
        raise ToolError("the expression is nested too deeply") from None


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant):
        # bool is an int subclass, but `True + 1` is not arithmetic a user meant.
        if isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        raise ToolError(f"only numbers are allowed, not {node.value!r}")
    if isinstance(node, ast.BinOp):
        if isinstance(node.op, ast.BitXor):
            raise ToolError("^ is not a power here; write ** (2**10)")
        function = _BINARY_OPERATORS.get(type(node.op))
        if function is None:
            raise ToolError(f"the operator {type(node.op).__name__} is not allowed; use + - * / // % **")
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        result = function(left, right)
        if isinstance(result, complex):  # (-8) ** 0.5
            raise ToolError("the result is not a real number")
        if isinstance(result, int) and result.bit_length() > MAX_INTEGER_BITS:
            raise ToolError("the result is too large")
        return result
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPERATORS:
        return _UNARY_OPERATORS[type(node.op)](_evaluate(node.operand))
    kinds = {ast.Name: "a name", ast.Call: "a function call", ast.Attribute: "an attribute", ast.Subscript: "indexing"}
    what = next((label for kind, label in kinds.items() if isinstance(node, kind)), f"a {type(node).__name__} node")
    raise ToolError(f"only numbers, + - * / // % ** and parentheses are allowed, not {what}: "
                    f"{ast.unparse(node)[:60]!r}")


def _check_power(base: int | float, exponent: int | float) -> None:
    """Refuse a power before computing it when its integer result would be too large to be worth computing."""
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if exponent * math.log2(abs(base)) > MAX_INTEGER_BITS:
            raise ToolError("the result is too large")


def make_calculator() -> Tool:
    return Tool(
        name="calculator",
        description="Evaluates an arithmetic expression with + - * / // % ** and parentheses, e.g. (3 + 4) * 12",
        parameters={"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
        run=calculate,
    )


# The file search -----------------------------------------------------------------------------------------------------

MAX_FILE_BYTES = 1 << 20  # larger files are listed but not searched for text
MAX_RESULTS = 50
MAX_LINES_PER_FILE = 3


def search_files(root: Path, pattern: str = "**/*", contains: str | None = None, max_results: int = 20
                 ) -> list[dict[str, Any]]:
    """Files below `root` matching the glob `pattern`; with `contains`, only text files with a line containing it
    (case-insensitive), with up to three such lines each.

    Paths in the result are relative to `root`. Patterns that leave `root` (absolute, with `..`) are refused, and a
    match that a symbolic link leads outside `root` is skipped, so the model can read nothing else on the machine.
    """
    root = Path(root).resolve()
    if not isinstance(pattern, str) or not pattern.strip():
        raise ToolError("pattern must be a non-empty glob such as **/*.py")
    pure = PurePath(pattern)
    if pure.is_absolute() or pattern.startswith("~") or ".." in pure.parts:
        raise ToolError(f"the pattern {pattern!r} leaves the search folder; give a pattern relative to it")
    if contains is not None and not isinstance(contains, str):
        raise ToolError("contains must be a string")
    if not isinstance(max_results, int) or isinstance(max_results, bool) or not 1 <= max_results <= MAX_RESULTS:
        raise ToolError(f"max_results must be a whole number from 1 to {MAX_RESULTS}")
    needle = contains.casefold() if contains else None

    found: list[dict[str, Any]] = []
    try:
        matches = sorted(root.glob(pattern))
    except (ValueError, NotImplementedError) as error:  # e.g. a malformed `**` pattern
        raise ToolError(f"bad pattern {pattern!r}: {error}") from None
    for path in matches:
        resolved = path.resolve()
        if not resolved.is_file() or not resolved.is_relative_to(root):
            continue
        entry: dict[str, Any] = {"path": path.relative_to(root).as_posix()}
        if needle is not None:
            lines = _matching_lines(resolved, needle)
            if not lines:
                continue
            entry["lines"] = lines
        found.append(entry)
        if len(found) == max_results:
            break
    return found


def _matching_lines(path: Path, needle: str) -> list[str]:
    if path.stat().st_size > MAX_FILE_BYTES:
        return []
    data = path.read_bytes()
    if b"\0" in data[:8192]:  # binary
        return []
    hits = []
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if needle in line.casefold():
            hits.append(f"{number}: {line.strip()[:200]}")
            if len(hits) == MAX_LINES_PER_FILE:
                break
    return hits


def make_file_search(root: Path) -> Tool:
    def run(pattern: str = "**/*", contains: str | None = None, max_results: int = 20) -> list[dict[str, Any]]:
        return search_files(root, pattern, contains, max_results)

    return Tool(
        name="file_search",
        # The root is not named here: the prompt would change with the folder, and the model needs only relative paths.
        description="Finds files in the user's folder by glob pattern (e.g. **/*.md), optionally only those "
                    "containing a text, and returns their paths with the matching lines",
        parameters={
            "type": "object",
            "properties": {
                "pattern": {"type": "string", "description": "glob relative to the folder, e.g. **/*.py"},
                "contains": {"type": "string", "description": "text the file must contain (case-insensitive)"},
                "max_results": {"type": "integer", "description": f"at most this many files, 1 to {MAX_RESULTS}"},
            },
            "required": ["pattern"],
        },
        run=run,
    )


def default_tools(root: Path) -> list[Tool]:
    return [make_calculator(), make_file_search(root)]


def run_tool(tools: Sequence[Tool], name: str, arguments: str) -> str:
    """The observation for a call: the tool's result as text (JSON unless it returned a string), or an error.

    Every failure becomes an observation starting with `Error:` instead of an exception, so the model can read what
    went wrong and try again, as it would with any other tool result.
    """
    tool = next((tool for tool in tools if tool.name == name), None)
    if tool is None:
        return f"Error: there is no tool named {name!r}; the tools are {', '.join(t.name for t in tools)}."
    try:
        kwargs = _arguments(tool, arguments)
        result = tool.run(**kwargs)
    except ToolError as error:
        return f"Error: {error}"
    except TypeError as error:  # missing or unexpected argument names
        return f"Error: bad arguments {arguments!r} for {name}: {error}"
    except OSError as error:  # e.g. a file the search may not read
        return f"Error: {error}"
    return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)


def _arguments(tool: Tool, arguments: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        value = arguments
    if isinstance(value, dict):
        return value
    # Models often write a bare value (`Action Input: 2+2`); it can only mean the tool's one required argument.
    required = tool.parameters.get("required", [])
    if len(required) == 1:
        return {required[0]: arguments.strip() if not isinstance(value, str) else value}
    raise ToolError(f"the arguments must be a JSON object such as {{\"{required[0] if required else 'x'}\": ...}}")


# --------------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    thought: str | None
    action: str
    action_input: str
    observation: str


@dataclass
class AgentResult:
    answer: str | None  # None when the step limit ended the loop
    steps: list[Step] = field(default_factory=list)
    stopped_by: Literal["answer", "step_limit"] = "answer"


# (messages, functions) -> the reply's text, cut before a stop string (`Observation:` where a tool's result goes)
Generate = Callable[[list[dict[str, Any]], list[dict[str, Any]]], str]


def react_loop(
    generate: Generate,
    query: str,
    tools: Sequence[Tool],
    max_steps: int = 5,
    on_step: Callable[[Step], None] | None = None,
) -> AgentResult:
    """Ask `query`, running the tools the model calls, until it gives a final answer or `max_steps` replies passed.

    The conversation is kept as OpenAI-style messages (assistant messages with `tool_calls`, `tool` results), and
    `qwen.react` writes it as the ReAct transcript, exactly as the server does for an OpenAI client.
    """
    if max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}.")
    # The server's checks of function specs (unique names, JSON parameters), so a bad tool fails here, not mid-run.
    functions = react.normalize_tools(functions=[tool.spec() for tool in tools])
    messages: list[dict[str, Any]] = [{"role": "user", "content": query}]
    result = AgentResult(answer=None)
    for step_number in range(max_steps):
        reply = react.parse_react_output(generate(messages, functions))
        if reply.function_name is None:
            # A final answer, or a reply that ignored the format: either way the model is done.
            result.answer = (reply.content or "").strip()
            return result
        arguments = reply.arguments or ""
        observation = run_tool(tools, reply.function_name, arguments)
        step = Step(reply.content, reply.function_name, arguments, observation)
        result.steps.append(step)
        if on_step is not None:
            on_step(step)
        call_id = f"call_{step_number}"
        messages.append({"role": "assistant", "content": reply.content, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": reply.function_name, "arguments": arguments}}]})
        messages.append({"role": "tool", "tool_call_id": call_id, "content": observation})
    result.stopped_by = "step_limit"
    return result


class EngineGenerate:
    """`Generate` on the shared generation engine: each step is the library's chat turn for the conversation (its
    window, budget and ReAct stop words), sampled with the checkpoint's settings."""

    def __init__(self, model: Any, tokenizer: Any, seed: int | None = None, max_new_tokens: int | None = None) -> None:
        SamplingParams.from_generation_config(model.generation_config)  # unusable settings fail here, not mid-run
        self.engine = GenerationEngine(model, tokenizer, max_batch_size=1)
        self.tokenizer, self.generation_config = tokenizer, model.generation_config
        self.seed, self.max_new_tokens = seed, max_new_tokens

    def __call__(self, messages: list[dict[str, Any]], functions: list[dict[str, Any]]) -> str:
        turn = messages_turn(self.tokenizer, messages, functions, self.generation_config, self.engine.max_context,
                             max_new_tokens=self.max_new_tokens)
        text = ""
        for event in self.engine.submit(turn.prompt_ids, turn.sampling_params(seed=self.seed)):
            if event.finish_reason == "error":
                raise RuntimeError(f"generation failed: {event.error}")
            text += event.text
        return text

    def close(self) -> None:
        self.engine.close()


# C0/C1 control characters except newline and tab: model text and file contents must not drive the terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _show(label: str, text: str | None) -> None:
    safe = _CONTROL.sub(lambda match: "\\x%02x" % ord(match.group()), text or "")
    print(f"{label}: {safe}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--query", required=True, help="the question for the agent")
    parser.add_argument("--root", type=Path, default=Path.cwd(),
                        help="the folder the file search may read (default: the current folder)")
    parser.add_argument("--max-steps", type=int, default=5, help="most model replies before giving up")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="longest reply per step")
    parser.add_argument("--seed", type=int, default=1234, help="sampling seed, for repeatable runs")
    args = parser.parse_args(argv)
    if args.max_steps < 1:
        parser.error("--max-steps must be at least 1")
    if not args.root.is_dir():
        parser.error(f"--root {args.root} is not a folder")

    model, tokenizer = load_from_args(args)
    generate = EngineGenerate(model, tokenizer, seed=args.seed, max_new_tokens=args.max_new_tokens)

    def show_step(step: Step) -> None:
        _show("Thought", step.thought)
        _show("Action", f"{step.action} {step.action_input}")
        _show("Observation", step.observation)

    try:
        result = react_loop(generate, args.query, default_tools(args.root), max_steps=args.max_steps,
                            on_step=show_step)
    except ValueError as error:  # the conversation outgrew the model's context
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        generate.close()
    if result.stopped_by == "step_limit":
        print(f"No final answer after {args.max_steps} steps (raise --max-steps).", file=sys.stderr)
        return 2
    _show("Final Answer", result.answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
