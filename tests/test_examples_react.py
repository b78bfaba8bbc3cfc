"""examples/react_demo.py: its tools, and its loop driving real checkpoints (no stand-in model, no mocked tools)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import WEATHER_ANSWER, WEATHER_ARGUMENTS, WEATHER_QUESTION, WEATHER_RESULT, WEATHER_THOUGHT, WEATHER_TOOLS
from support import REPO, checkout_env

sys.path.insert(0, str(REPO / "examples"))

import react_demo  # noqa: E402
from react_demo import EngineGenerate, Tool, ToolError, calculate, react_loop, run_tool, search_files  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------------
# The calculator


@pytest.mark.parametrize(("expression", "value"), [
    ("1 + 2 * 3", 7), ("(3 + 4) * 12", 84), ("2 ** 10", 1024), ("7 / 2", 3.5), ("7 // 2", 3), ("-3 % 5", 2),
    ("2 ** -2", 0.25), ("+-1.5e3", -1500.0), (" 0.1 + 0.2 ", 0.1 + 0.2),
])
def test_calculator_computes_arithmetic(expression: str, value: float) -> None:
    assert calculate(expression) == value


@pytest.mark.parametrize(("expression", "message"), [
    ("__import__('os')", "not a function call"),
    ("__import__('os').system('echo owned')", "not a function call"),
    ("open('/etc/passwd').read()", "not a function call"),
    ("().__class__.__bases__", "not an attribute"),
    ("x + 1", "not a name"),
    ("'a' * 3", "only numbers are allowed, not 'a'"),
    ("True + 1", "only numbers are allowed, not True"),
    ("[1, 2][0]", "not indexing"),
    ("lambda: 1", "not a Lambda node"),
    ("1 if 1 else 2", "not a IfExp node"),
    ("2 ^ 10", "write \\*\\*"),
    ("1 << 3", "operator LShift is not allowed"),
    ("1 / 0", "division by zero"),
    ("9 ** 9 ** 9", "too large"),
    ("10.0 ** 400", "too large for a float"),
    ("(-8) ** 0.5", "not a real number"),
    ("1 +", "is not an arithmetic expression"),
    ("import os", "is not an arithmetic expression"),
    ("1" + "+1" * 300, "longer than 500 characters"),
])
def test_calculator_refuses_everything_but_arithmetic(expression: str, message: str) -> None:
    with pytest.raises(ToolError, match=message):
        calculate(expression)


def test_calculator_never_runs_code(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with pytest.raises(ToolError):
        calculate(f"__import__('pathlib').Path({str(marker)!r}).touch()")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------------
# The file search


@pytest.fixture()
def notes(tmp_path: Path) -> Path:
    root = tmp_path / "notes"
    (root / "sub").mkdir(parents=True)
    (root / "a.md").write_text("# A\ntiktoken is fast\nnothing here\n", encoding="utf-8")
    (root / "sub" / "b.md").write_text("TikToken again\n", encoding="utf-8")
    (root / "sub" / "c.py").write_text("print('hello')\n", encoding="utf-8")
    (root / "blob.bin").write_bytes(b"\0tiktoken\0")
    (tmp_path / "secret.txt").write_text("tiktoken password\n", encoding="utf-8")
    (root / "escape.md").symlink_to(tmp_path / "secret.txt")  # a link out of the root
    return root


def test_file_search_by_pattern_and_text(notes: Path) -> None:
    assert [hit["path"] for hit in search_files(notes, "**/*.md")] == ["a.md", "sub/b.md"]
    assert search_files(notes, "**/*", contains="TIKTOKEN") == [
        {"path": "a.md", "lines": ["2: tiktoken is fast"]},
        {"path": "sub/b.md", "lines": ["1: TikToken again"]},
    ]  # case-insensitive; the binary file and the link leading out of the root are skipped
    assert search_files(notes, "**/*.py", max_results=1) == [{"path": "sub/c.py"}]
    assert search_files(notes, "*.txt") == []


@pytest.mark.parametrize("pattern", ["../*", "../secret.txt", "sub/../../*", "/etc/*", "~/*"])
def test_file_search_cannot_leave_its_root(notes: Path, pattern: str) -> None:
    with pytest.raises(ToolError, match="leaves the search folder"):
        search_files(notes, pattern)


def test_file_search_argument_errors(notes: Path) -> None:
    with pytest.raises(ToolError, match="max_results must be"):
        search_files(notes, "*", max_results=1000)
    with pytest.raises(ToolError, match="non-empty glob"):
        search_files(notes, " ")


# ---------------------------------------------------------------------------------------------------------------------
# Routing a call to a tool


def test_run_tool_turns_every_failure_into_an_observation(notes: Path) -> None:
    tools = react_demo.default_tools(notes)
    assert run_tool(tools, "calculator", '{"expression": "(3 + 4) * 12"}') == "84"
    assert run_tool(tools, "calculator", "6 * 7") == "42"  # a bare value goes to the one required argument
    assert run_tool(tools, "calculator", '"6 * 7"') == "42"
    assert run_tool(tools, "calculator", '{"expression": "__import__(\'os\')"}').startswith(
        "Error: only numbers, + - * / // % ** and parentheses are allowed, not a function call")
    assert json.loads(run_tool(tools, "file_search", '{"pattern": "**/*.md", "contains": "again"}')) == [
        {"path": "sub/b.md", "lines": ["1: TikToken again"]}]
    assert run_tool(tools, "file_search", '{"pattern": "../*"}').startswith("Error: the pattern '../*' leaves")
    assert run_tool(tools, "calculator", '{"expr": "1"}').startswith("Error: bad arguments")
    assert run_tool(tools, "shell", "rm -rf /") == (
        "Error: there is no tool named 'shell'; the tools are calculator, file_search.")


# ---------------------------------------------------------------------------------------------------------------------
# The loop against a real model


def weather_tool() -> Tool:
    spec = WEATHER_TOOLS[0]["function"]
    temperatures = {"Paris": 21}
    return Tool(spec["name"], spec["description"], spec["parameters"], lambda city: {"temp_c": temperatures[city]})


@pytest.fixture(scope="module")
def tool_model(tool_chat_dir):
    from qwen.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(tool_chat_dir, cpu_only=True)
    generate = EngineGenerate(model, tokenizer, seed=0, max_new_tokens=64)
    yield generate, tokenizer
    generate.close()


def test_loop_routes_the_models_call_to_the_tool_and_returns_its_answer(tool_model) -> None:
    # tool_chat_dir was trained on the server's weather transcript; the loop builds the same prompts, so the model
    # calls get_weather, and its final answer is only right if the tool's real result went back as the observation.
    generate, tokenizer = tool_model
    seen = []
    result = react_loop(generate, WEATHER_QUESTION, [weather_tool()], max_steps=3, on_step=seen.append)
    assert result.stopped_by == "answer" and result.answer == WEATHER_ANSWER
    assert result.steps == seen == [react_demo.Step(WEATHER_THOUGHT, "get_weather", WEATHER_ARGUMENTS, WEATHER_RESULT)]


def test_loop_stops_at_the_step_limit(tool_model) -> None:
    generate, tokenizer = tool_model
    result = react_loop(generate, WEATHER_QUESTION, [weather_tool()], max_steps=1)
    assert (result.stopped_by, result.answer, len(result.steps)) == ("step_limit", None, 1)
    assert result.steps[0].observation == WEATHER_RESULT


def test_loop_argument_errors(tool_model) -> None:
    generate, tokenizer = tool_model
    with pytest.raises(ValueError, match="max_steps must be at least 1"):
        react_loop(generate, "hi", [weather_tool()], max_steps=0)
    with pytest.raises(ValueError, match="unique"):
        react_loop(generate, "hi", [weather_tool(), weather_tool()])


def test_command_line_runs_the_loop(tiny_chat_dir, tmp_path: Path, capsys) -> None:
    # A random-weight model ignores the ReAct format, so its first reply is the (noise) answer; what is checked is
    # that the script loads the checkpoint, runs the loop and prints the answer. In-process for speed: the slow test
    # below runs the script as a program.
    code = react_demo.main(["-c", str(tiny_chat_dir), "--cpu-only", "--query", "What is 2 + 3?", "--root",
                            str(tmp_path), "--max-steps", "2", "--max-new-tokens", "8"])
    assert code == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("Final Answer: ")


def test_command_line_errors(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        react_demo.main(["-c", "unused", "--query", "hi", "--max-steps", "0"])
    assert exit_info.value.code == 2 and "--max-steps must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        react_demo.main(["-c", "unused", "--query", "hi", "--root", str(tmp_path / "missing")])
    assert "is not a folder" in capsys.readouterr().err


@pytest.mark.slow
def test_command_line_with_a_model_trained_on_the_demos_own_tools(tmp_path_factory, tokenizer, vocab_file,
                                                                   tmp_path: Path) -> None:
    # A tiny checkpoint trained on the demo's real prompts (both tools described) to call the calculator, and to
    # answer 84 after the observation "84". The script must route the call to the calculator, and the calculator must
    # return exactly "84", or the second prompt is one the model never saw and the answer is noise.
    from trained_checkpoint import memorizing_checkpoint_cached

    from qwen.react import chat_prompt_ids

    question = "What is (3 + 4) * 12?"
    call = {"id": "call_0", "type": "function",
            "function": {"name": "calculator", "arguments": '{"expression": "(3 + 4) * 12"}'}}
    replies = [
        ([{"role": "user", "content": question}],
         'Thought: I should compute it.\nAction: calculator\nAction Input: {"expression": "(3 + 4) * 12"}'
         "\nObservation:"),
        ([{"role": "user", "content": question}, {"role": "assistant", "content": "I should compute it.",
                                                   "tool_calls": [call]},
          {"role": "tool", "tool_call_id": "call_0", "content": "84"}],
         " I now know the final answer.\nFinal Answer: (3 + 4) * 12 = 84"),
    ]
    functions = [tool.spec() for tool in react_demo.default_tools(tmp_path)]
    conversations = [
        (chat_prompt_ids(tokenizer, messages, functions, 6144),
         tokenizer.encode(reply, allowed_special=set(), disallowed_special=()) + [tokenizer.im_end_id])
        for messages, reply in replies
    ]
    folder = memorizing_checkpoint_cached(tmp_path_factory.getbasetemp() / "memorized", conversations,
                                         vocab_file=vocab_file, seq_length=1024)
    command = [sys.executable, str(REPO / "examples" / "react_demo.py"), "-c", str(folder), "--cpu-only",
               "--query", question, "--root", str(tmp_path), "--max-new-tokens", "64"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=checkout_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [
        "Thought: I should compute it.",
        'Action: calculator {"expression": "(3 + 4) * 12"}',
        "Observation: 84",
        "Final Answer: (3 + 4) * 12 = 84",
    ]
