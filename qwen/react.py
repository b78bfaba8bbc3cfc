"""Function calling for Qwen-Chat through ReAct prompts, as the original `openai_api.py` (QwenLM/Qwen, 2023) did it.

Qwen (v1) has no tool-call tokens. The chat models were trained to use tools through a ReAct transcript written as
plain text inside ChatML turns: the tool list and the ReAct format go in front of the user's question, the model
answers with `Thought: ...\\nAction: name\\nAction Input: arguments`, generation stops at `Observation:`, the tool's
result is written back as `\\nObservation: result` and the model ends with `Final Answer: ...`. This module turns
OpenAI-style requests (`functions`/`function_call` or `tools`/`tool_choice`) into that transcript and reads the
model's text back, and `chat_prompt` turns a whole conversation into the prompt (with `make_context`); the rest is
pure string work. `chat_turn.messages_turn` builds a whole turn (window, budget, stops, parser) on top of it.

The two prompt templates are byte for byte those of the original, because the released weights learned them. The
rules follow the original too, with these decisions where it was silent, ambiguous or failed on valid OpenAI input
(each one is also stated where it is implemented):

- The ReAct instruction goes where the original put it: in front of the last user question that already has an
  assistant reply in the history, or in front of the new query when the history is empty. Only that question gets the
  `Question: ` prefix.
- A conversation that ends with an assistant message or a tool result (the usual turn after a tool call) has no new
  question: the query is None and the model continues the last assistant turn (see `continuation_parts`).
- Consecutive user messages are joined with a blank line (the original rejected them; the OpenAI API accepts them).
  Consecutive assistant messages are joined with a newline, as in the original.
- Parallel tool calls become consecutive Thought/Action/Observation steps, each result after its own call, later
  steps with the empty thought the original wrote for a call without content.
- Parsing is decided by the first marker: text before the first `\\nAction:` or `\\nFinal Answer: ` is the thought;
  once a final answer starts, markers inside it are text. The original searched the whole reply, which gives the same
  result on every reply the model writes in the trained format and lets a stream show the answer as it is written.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypedDict

from .qwen_generation_utils import DEFAULT_SYSTEM_PROMPT, make_context

# --------------------------------------------------------------------------------------------------------------------
# Chat data as the OpenAI API sends it
# --------------------------------------------------------------------------------------------------------------------

Role = Literal["system", "user", "assistant", "function", "tool"]


class TextPart(TypedDict):
    type: Literal["text"]
    text: str


class FunctionCall(TypedDict):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(TypedDict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class _MessageBase(TypedDict):
    role: Role


class Message(_MessageBase, total=False):
    content: str | list[TextPart] | None
    name: str
    function_call: FunctionCall  # legacy API: an assistant's call
    tool_calls: list[ToolCall]  # current API: an assistant's calls
    tool_call_id: str  # role "tool": which call this result answers



# The released models were trained on these exact strings: never edit them.
TOOL_DESCRIPTION = (
    '{name_for_model}: Call this tool to interact with the {name_for_human} API.'
    ' What is the {name_for_human} API useful for? {description_for_model} Parameters: {parameters}'
)

REACT_INSTRUCTION = """Answer the following questions as best you can. You have access to the following APIs:

{tools_text}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{tools_name_text}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""

STOP_WORDS = ["Observation:", "Observation:\n"]

_ACTION = "\nAction:"
_ACTION_INPUT = "\nAction Input:"
_OBSERVATION = "\nObservation:"
_FINAL_ANSWER = "\nFinal Answer: "
_THOUGHT = "Thought: "


# --------------------------------------------------------------------------------------------------------------------
# Which functions go into the prompt
# --------------------------------------------------------------------------------------------------------------------


def normalize_tools(
    functions: Sequence[Mapping[str, Any]] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: str | Mapping[str, Any] | None = None,
    function_call: str | Mapping[str, Any] | None = None,
) -> list[dict[str, Any]] | None:
    """The function specs to describe in the prompt, from either generation of the OpenAI API; None for a plain chat.

    A ReAct prompt cannot force the model to call something, so the choice only narrows what the prompt offers:
    "none" offers nothing, a named function is offered alone, "auto" and "required" offer every function.
    """
    legacy = functions is not None or function_call is not None
    current = tools is not None or tool_choice is not None
    if legacy and current:
        raise ValueError("Send either functions/function_call (legacy API) or tools/tool_choice, not both.")
    if legacy:
        specs = [_function_spec(entry, f"functions[{i}]") for i, entry in enumerate(functions or [])]
        chosen = _chosen_function(function_call, "function_call", ("auto", "none"))
    else:
        specs = [_function_spec(_tool_function(entry, f"tools[{i}]"), f"tools[{i}].function")
                 for i, entry in enumerate(tools or [])]
        chosen = _chosen_function(tool_choice, "tool_choice", ("auto", "none", "required"))

    names = [spec["name"] for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"Function names must be unique; repeated: {', '.join(duplicates)}.")
    if chosen == "none" or (not specs and chosen == "auto"):
        return None
    if not specs:
        raise ValueError(f"A tool choice of {chosen!r} needs functions or tools to choose from.")
    if chosen in ("auto", "required"):
        return specs
    if chosen not in names:
        raise ValueError(f"The tool choice names function {chosen!r}, which is not among the functions given "
                         f"({', '.join(names)}).")
    return [specs[names.index(chosen)]]


def _tool_function(entry: Any, where: str) -> Any:
    function = entry.get("function") if isinstance(entry, Mapping) and entry.get("type") == "function" else None
    if not isinstance(function, Mapping):
        raise ValueError(f"{where} must look like {{'type': 'function', 'function': {{'name': ..., ...}}}}.")
    return function


def _function_spec(spec: Any, where: str) -> dict[str, Any]:
    """A shallow copy of one function spec, checked so that prompt building cannot fail on it later."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where} must be an object with a 'name', got {type(spec).__name__}.")
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise ValueError(f"{where} needs a non-empty string 'name'.")
    for key in ("description", "name_for_model", "name_for_human", "description_for_model"):
        if key in spec and not isinstance(spec[key], str):
            raise ValueError(f"{where}.{key} must be a string.")
    if "parameters" in spec:
        if not isinstance(spec["parameters"], (Mapping, list)):
            raise ValueError(f"{where}.parameters must be a JSON Schema object.")
        try:
            json.dumps(spec["parameters"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}.parameters is not JSON: {error}") from error
    return dict(spec)


def _chosen_function(choice: Any, field: str, keywords: tuple[str, ...]) -> str:
    """The caller's choice as one word ("auto", "none", "required") or the name of the function it picked."""
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        if choice not in keywords:
            raise ValueError(f"{field} must be one of {', '.join(map(repr, keywords))} or name a function, "
                             f"got {choice!r}.")
        return choice
    if field == "tool_choice":  # {"type": "function", "function": {"name": ...}}
        shape = "{'type': 'function', 'function': {'name': ...}}"
        is_function = isinstance(choice, Mapping) and choice.get("type") == "function"
        named = choice.get("function") if is_function else None
    else:  # the legacy {"name": ...}
        shape, named = "{'name': ...}", choice
    if not isinstance(named, Mapping) or not isinstance(named.get("name"), str) or not named["name"]:
        raise ValueError(f"{field} must be a string or {shape}, got {choice!r}.")
    return named["name"]


# --------------------------------------------------------------------------------------------------------------------
# Messages to (system, history, query)
# --------------------------------------------------------------------------------------------------------------------


def react_instruction(functions: Sequence[Mapping[str, Any]]) -> str:
    """The text that teaches the model the tools and the ReAct format, put in front of a user question."""
    descriptions, names = [], []
    for spec in functions:
        name = spec.get("name", "")
        name_for_model = spec.get("name_for_model", name)
        description = spec.get("description", "")
        descriptions.append(TOOL_DESCRIPTION.format(
            name_for_model=name_for_model,
            name_for_human=spec.get("name_for_human", name),
            description_for_model=spec.get("description_for_model", description),
            # The original required "parameters"; OpenAI lets a function without arguments leave it out.
            parameters=json.dumps(spec.get("parameters", {}), ensure_ascii=False),
        ))
        names.append(name_for_model)
    text = REACT_INSTRUCTION.format(tools_text="\n\n".join(descriptions), tools_name_text=", ".join(names))
    return text.lstrip("\n").rstrip()


@dataclass
class _Call:
    """One function call of an assistant message, waiting for its result."""

    call_id: str | None  # None for a legacy function_call, which results answer in order
    name: str
    arguments: str
    observation: str | None = None


@dataclass
class _Calls:
    """The calls of the latest assistant message; tool results fill them in until the next user or assistant turn."""

    index: int  # of the assistant message, for error messages
    thought: str
    calls: list[_Call]


def build_react_conversation(
    messages: Sequence[Mapping[str, Any]],
    functions: Sequence[Mapping[str, Any]] | None,
) -> tuple[str, list[tuple[str, str]], str | None]:
    """(system, history, query) for `make_context`, with tool use written as the ReAct text Qwen-Chat was trained on.

    `query` is None when the conversation ends with the assistant's own turn, typically a tool result that came back
    after its call: the original then let the model continue the last history turn, which ends in `\\nThought:`,
    instead of starting a new one. `continuation_parts(history)` gives the pieces for that prompt.

    Without functions and tool calls the result is the plain chat: the system message (or the default one), the
    (user, assistant) pairs and the last user message.
    """
    if not messages:
        raise ValueError("messages is empty: a chat request needs at least one user message.")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{index}] must be an object, got {type(message).__name__}.")
        if message.get("role") not in ("system", "user", "assistant", "function", "tool"):
            raise ValueError(f"messages[{index}] has unknown role {message.get('role')!r}: expected system, user, "
                             "assistant, function or tool.")
    if all(message["role"] != "user" for message in messages):
        raise ValueError("messages has no user message: a chat request needs at least one.")

    system, first = DEFAULT_SYSTEM_PROMPT, 0
    if messages[0]["role"] == "system":
        system, first = _text(messages[0], 0), 1
    turns: list[list[str]] = []  # [role, text], alternating user / assistant, starting with user
    pending: _Calls | None = None
    for index in range(first, len(messages)):
        message = messages[index]
        role, text = message["role"], _text(message, index)
        if role == "system":
            raise ValueError(f"messages[{index}] is a system message; only the first message may be one.")
        if role in ("function", "tool"):
            _add_result(pending, message, text, index)
            continue
        _close(turns, pending)
        pending = None
        if role == "user":
            if turns and turns[-1][0] == "user":
                turns[-1][1] += "\n\n" + text  # the original could not represent two questions in a row
            else:
                turns.append(["user", text])
            continue
        if not turns:
            raise ValueError(f"messages[{index}] is an assistant message before any user message.")
        calls = _calls_of(message, index)
        if calls:
            pending = _Calls(index, text, calls)
        else:
            _add_assistant_text(turns, f"Thought: I now know the final answer.\nFinal Answer: {text}" if functions
                                else text)
    _close(turns, pending)
    if messages[-1]["role"] in ("function", "tool"):
        turns[-1][1] += "\nThought:"  # the model goes on thinking about the result

    query = _clean(turns.pop()[1]) if turns[-1][0] == "user" else None
    history = [(_clean(turns[i][1]), _clean(turns[i + 1][1])) for i in range(0, len(turns), 2)]
    if functions:
        # Where the original put it: on the last answered question if there is one, else on the new one.
        instruction = react_instruction(functions)
        if history:
            question, answer = history[-1]
            history[-1] = (f"{instruction}\n\nQuestion: {question}", answer)
        else:
            query = f"{instruction}\n\nQuestion: {query}"
    return system, history, query


def continuation_parts(history: Sequence[tuple[str, str]]) -> tuple[list[tuple[str, str]], str, str]:
    """(earlier history, last question, assistant text so far) for a conversation whose query is None.

    The original prompted the model with ChatML of the system and the whole history, the last `<|im_end|>` left out,
    so that the model continues the last assistant turn. That is `make_context(tokenizer, question, earlier, system)`
    followed by the assistant text so far, encoded as plain text.
    """
    if not history:
        raise ValueError("There is no assistant turn to continue.")
    *earlier, (question, partial) = history
    return list(earlier), question, partial


def _clean(text: str) -> str:
    return text.lstrip("\n").rstrip()


def _text(message: Mapping[str, Any], index: int) -> str:
    """The message's text, as the original trimmed it; list content joins its text parts with newlines."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ValueError(f"messages[{index}] has a content part of type {kind!r}; Qwen-Chat reads text "
                                 "parts only.")
            texts.append(part["text"])
        content = "\n".join(texts)
    if not isinstance(content, str):
        raise ValueError(f"messages[{index}].content must be a string, a list of text parts or null, got "
                         f"{type(content).__name__}.")
    return _clean(content)


def _arguments(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):  # some clients send the arguments already decoded
        return json.dumps(value, ensure_ascii=False)
    raise ValueError(f"{where}.arguments must be a JSON string.")


def _calls_of(message: Mapping[str, Any], index: int) -> list[_Call]:
    function_call, tool_calls = message.get("function_call"), message.get("tool_calls")
    if function_call and tool_calls:
        raise ValueError(f"messages[{index}] has both function_call and tool_calls; send one of them.")
    if function_call:
        where = f"messages[{index}].function_call"
        if not isinstance(function_call, Mapping) or not isinstance(function_call.get("name"), str) \
                or not function_call["name"]:
            raise ValueError(f"{where} must be {{'name': ..., 'arguments': ...}}.")
        return [_Call(None, function_call["name"], _arguments(function_call.get("arguments"), where))]
    if not tool_calls:
        return []
    if not isinstance(tool_calls, list):
        raise ValueError(f"messages[{index}].tool_calls must be a list.")
    calls = []
    for position, tool_call in enumerate(tool_calls):
        where = f"messages[{index}].tool_calls[{position}]"
        if not isinstance(tool_call, Mapping) or tool_call.get("type", "function") != "function" \
                or not isinstance(tool_call.get("id"), str) or not isinstance(tool_call.get("function"), Mapping) \
                or not isinstance(tool_call["function"].get("name"), str) or not tool_call["function"]["name"]:
            raise ValueError(f"{where} must be {{'id': ..., 'type': 'function', 'function': {{'name': ..., "
                             "'arguments': ...}}.")
        if any(call.call_id == tool_call["id"] for call in calls):
            raise ValueError(f"{where} repeats the id {tool_call['id']!r}.")
        function = tool_call["function"]
        calls.append(_Call(tool_call["id"], function["name"], _arguments(function.get("arguments"), where)))
    return calls


def _add_result(pending: _Calls | None, message: Mapping[str, Any], text: str, index: int) -> None:
    """Attach a function or tool result to the call it answers: tool results by id, function results in order."""
    role = message["role"]
    if pending is None:
        raise ValueError(f"messages[{index}] is a {role} result without a preceding assistant function call.")
    if role == "tool":
        call_id = message.get("tool_call_id")
        matches = [call for call in pending.calls if call.call_id is not None and call.call_id == call_id]
        if not matches:
            raise ValueError(f"messages[{index}] answers tool_call_id {call_id!r}, which is not a call of "
                             f"messages[{pending.index}].")
        call = matches[0]
        if call.observation is not None:
            raise ValueError(f"messages[{index}] is a second result for tool call {call_id!r}.")
    else:
        waiting = [call for call in pending.calls if call.observation is None]
        if not waiting:
            raise ValueError(f"messages[{index}] is a function result, but every call of messages[{pending.index}] "
                             "already has one.")
        call = waiting[0]
    call.observation = text


def _add_assistant_text(turns: list[list[str]], text: str) -> None:
    """A new assistant turn after a question, or more of the current one (after tool results), as the original did."""
    if turns[-1][0] == "user":
        turns.append(["assistant", _clean(text)])
    else:
        turns[-1][1] += "\n" + text


def _close(turns: list[list[str]], pending: _Calls | None) -> None:
    """Write the latest assistant message's calls and their results into the transcript."""
    if pending is None:
        return
    for call in pending.calls:
        if call.call_id is not None and call.observation is None:
            # OpenAI rejects this too; a legacy call without a result is accepted, as in the original.
            raise ValueError(f"messages[{pending.index}] calls tool {call.call_id!r}, but no tool message answers it.")
    for position, call in enumerate(pending.calls):
        thought = pending.thought if position == 0 else ""
        if not thought.startswith("Thought:"):
            thought = f"Thought: {thought}"
        step = f"{thought}\nAction: {call.name}\nAction Input: {call.arguments}"
        if position == 0:
            _add_assistant_text(turns, step)
        else:
            turns[-1][1] += "\n" + step
        if call.observation is not None:
            turns[-1][1] += f"\nObservation: {call.observation}"


def chat_prompt(
    tokenizer: Any, messages: list[dict[str, Any]], functions: list[dict[str, Any]] | None, max_window_size: int
) -> tuple[str, list[int]]:
    """The ChatML prompt (text, ids) for OpenAI-style messages, with the ReAct transcript when there are functions;
    the history is trimmed to `max_window_size` as `make_context` trims it (`chat_turn.messages_turn` chooses the
    window by the one window policy).

    Raises ValueError for a conversation that cannot be written as a prompt (the message says which entry).
    """
    system, history, query = build_react_conversation(messages, functions)
    if query is not None:
        return make_context(tokenizer, query, history=history, system=system, max_window_size=max_window_size)
    # After a tool result (or an assistant message) the model continues the last assistant turn.
    earlier, question, partial = continuation_parts(history)
    text, ids = make_context(tokenizer, question, history=earlier, system=system, max_window_size=max_window_size)
    return text + partial, ids + tokenizer.encode(partial, allowed_special=set(), disallowed_special=())


def chat_prompt_ids(
    tokenizer: Any, messages: list[dict[str, Any]], functions: list[dict[str, Any]] | None, max_window_size: int
) -> list[int]:
    """The ids of `chat_prompt`."""
    return chat_prompt(tokenizer, messages, functions, max_window_size)[1]


def stop_words(functions: Sequence[Mapping[str, Any]] | None) -> list[str]:
    """Stop strings for a reply: with tools the model must stop where the tool's result would begin."""
    return list(STOP_WORDS) if functions else []


# --------------------------------------------------------------------------------------------------------------------
# Reading the model's reply
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedReply:
    """A finished reply: the text to show and, when the model called a function, the call."""

    content: str | None  # None only for a call without a thought, as OpenAI sends null content with a call
    function_name: str | None = None
    arguments: str | None = None
    finish_reason: Literal["stop", "function_call"] = "stop"


class _CallSpan(NamedTuple):
    action: int  # where `\nAction:` starts
    action_input: int  # where `\nAction Input:` starts
    name: str


def _find_call(text: str) -> _CallSpan | None:
    """The call a reply makes, decided by its first `\\nAction:`: one before any final answer, with a name and an
    `\\nAction Input:` after it. Once found it cannot change as the text grows, which is what streaming relies on."""
    action = text.find(_ACTION)
    if action < 0 or text.find(_FINAL_ANSWER, 0, action) >= 0:
        return None
    action_input = text.find(_ACTION_INPUT, action)
    if action_input < 0:
        return None
    name = text[action + len(_ACTION):action_input].strip()
    return _CallSpan(action, action_input, name) if name else None


def _thought(head: str) -> str | None:
    """The text before an action, shown to the user: from after its first `Thought: `, trimmed."""
    start = head.find(_THOUGHT)
    if start >= 0:
        head = head[start + len(_THOUGHT):]
    return head.strip() or None


def parse_react_output(text: str) -> ParsedReply:
    """Split a finished ReAct reply into what the user sees and the function call, if the model made one.

    The rules of the original: a call needs `\\nAction:` with a non-empty name and then `\\nAction Input:`; its
    arguments run to `\\nObservation:` (which a stop word usually cut off) or to the end; the content is the thought
    before the action. Otherwise the content is what follows `\\nFinal Answer: `, or the whole text.

    Decisions beyond the original: the start of the text counts as a line start, so a reply that begins with
    `Action:` or `Final Answer: ` (the original needed a newline before them) parses too; the first of
    `\\nAction:` / `\\nFinal Answer: ` decides, and markers after the start of a final answer belong to the answer
    (the original let a later action turn an answer into a call, and took the last final answer).
    """
    lined = "\n" + text
    call = _find_call(lined)
    if call is not None:
        start = call.action_input + len(_ACTION_INPUT)
        end = lined.find(_OBSERVATION, start)
        arguments = lined[start:end if end >= 0 else len(lined)].strip()
        return ParsedReply(_thought(lined[:call.action]), call.name, arguments, "function_call")
    answer = lined.find(_FINAL_ANSWER)
    if answer >= 0:
        return ParsedReply(lined[answer + len(_FINAL_ANSWER):])
    return ParsedReply(text)


@dataclass(frozen=True)
class StreamEvent:
    """Something to send while a reply streams: a piece of content, or the complete function call."""

    kind: Literal["content", "tool_call"]
    text: str = ""
    name: str | None = None
    arguments: str | None = None


class ReActStreamParser:
    """Turns the growing text of a ReAct reply into content deltas and, at the end, the function call.

    Everything it sends is final: the content deltas add up to `parse_react_output(text).content` whatever the
    chunking. That decides what can be shown early. Text before the first marker is held back, because it is
    dropped for a final answer, becomes the (trimmed) content of a call, or is the content as it stands when no marker
    comes, and only the marker or the end tells which; a half-written marker is part of that held text. A final
    answer streams as it is written; the thought of a call is sent once `\\nAction Input:` settles the call; the call
    itself is sent by `finish()`, when its arguments are complete.
    """

    def __init__(self) -> None:
        self._text = "\n"  # the reply so far, after a line start (see parse_react_output)
        self._sent = 0  # characters of content already sent
        self._answer_start: int | None = None  # set once the reply is a final answer
        self._call_thought: str | None = None  # set once the reply is a call
        self._finished = False
        self.called = False  # whether finish() sent a function call

    def feed(self, delta: str) -> list[StreamEvent]:
        if self._finished:
            raise RuntimeError("feed() after finish(): a ReActStreamParser reads one reply.")
        self._text += delta
        if self._answer_start is None and self._call_thought is None:
            call = _find_call(self._text)
            if call is not None:
                self._call_thought = _thought(self._text[:call.action]) or ""
            else:
                answer, action = self._text.find(_FINAL_ANSWER), self._text.find(_ACTION)
                if answer >= 0 and (action < 0 or answer < action):
                    self._answer_start = answer + len(_FINAL_ANSWER)
        if self._answer_start is not None:
            return self._send(self._text[self._answer_start + self._sent:])
        if self._call_thought is not None:
            return self._send(self._call_thought[self._sent:])
        return []

    def finish(self) -> list[StreamEvent]:
        """The held-back rest of the content and the call, once the reply has ended."""
        if self._finished:
            return []
        self._finished = True
        reply = parse_react_output(self._text[1:])
        events = self._send((reply.content or "")[self._sent:])
        if reply.function_name is not None:
            self.called = True
            events.append(StreamEvent("tool_call", name=reply.function_name, arguments=reply.arguments))
        return events

    def _send(self, text: str) -> list[StreamEvent]:
        self._sent += len(text)
        return [StreamEvent("content", text=text)] if text else []


def new_tool_call_id() -> str:
    """An id for a call the model made, so that the client's tool message can say which call it answers."""
    return "call_" + secrets.token_hex(12)
