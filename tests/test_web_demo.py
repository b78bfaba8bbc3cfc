"""The web demo in headless Chromium (Playwright), and its reply stream without a browser.

Two servers per module:
- `python web_demo.py -c demo`, a real process on 127.0.0.1, over a copy of the tiny checkpoint whose sampled replies
  run for 4000 tokens (minutes): it must show the random-weights note, and Stop, Clear or a closed tab must end a
  reply that would otherwise run on for nobody. That the engine really stopped is read from the process's CPU time.
- the page `build_demo` makes, served from this process with greedy 24-token replies: every reply it shows is
  checked against transformers' own `generate()`.

What the browser sends back is read from the page's requests: each reply event posts the textbox and the whole
conversation, which is exactly the history the model is given next. Every URL any page requests is recorded too:
nothing may leave 127.0.0.1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from qwen.engine import GenerationEngine, SamplingParams, chat_stop_token_ids
from qwen.qwen_generation_utils import make_context
from support import free_port, greedy_reference, stop, wait_until_serving

REPO = Path(__file__).resolve().parents[1]
# The README's screenshot is refreshed only on request, so a test run leaves the checkout as it found it.
SCREENSHOT = REPO / "assets" / "web_demo.png" if os.environ.get("QWEN_UPDATE_SCREENSHOT") else None
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-quic", "--disable-sync",
]
SYSTEM = "You are a helpful assistant."
REPETITION_PENALTY = 1.1  # the tiny checkpoint's, as the released chat models'
REPLY_TOKENS = 24  # the local app's replies: about half a second each
LONG_REPLY_TOKENS = 4000  # the demo server's: minutes of generation unless stopped

TRACKER = "#chatbot [data-testid='status-tracker']"
BOT = "#chatbot [data-testid='bot']"
USER = "#chatbot [data-testid='user']"

# Characters that mean something to Markdown and HTML: the page renders them, the model must get them as typed.
MARKDOWN_QUESTION = "Show **bold**, <b>tags</b> & `code`:\n```python\nprint(1 < 2)\n```"

# The app served from this process runs Gradio's queue, whose statistics code trips pandas 3 deprecations.
pytestmark = pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated",
                                        "ignore:The copy keyword is deprecated")


def greedy_params(tokenizer: Any, max_new_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=REPETITION_PENALTY,
                          stop_token_ids=chat_stop_token_ids(tokenizer))


@pytest.fixture(scope="module")
def web_demo():
    """web_demo.py imported as a module (it is a script at the repository root, not part of the package)."""
    spec = importlib.util.spec_from_file_location("web_demo", REPO / "web_demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["web_demo"] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------------------------------------


def checkpoint_copy(source: Path, folder: Path, **generation: object) -> Path:
    """A copy of a checkpoint with some generation_config.json fields changed."""
    shutil.copytree(source, folder)
    path = folder / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text(encoding="utf-8")), **generation}), encoding="utf-8")
    return folder


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path

    def cpu_seconds(self, over: float) -> float:
        """CPU time the server process (all its threads) uses during the next `over` seconds."""
        ticks = os.sysconf("SC_CLK_TCK")

        def used() -> float:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime

        start = used()
        time.sleep(over)
        return used() - start


@pytest.fixture(scope="module")
def demo_server_started(tmp_path_factory, tiny_chat_dir, vocab_file) -> Iterator[Server]:
    """`web_demo.py -c demo`, started without waiting for it: it boots while the browser and the local app start."""
    folder = tmp_path_factory.mktemp("web-demo")
    # `-c demo` takes the folder QWEN_DEMO_CHECKPOINT names as it is once it holds a checkpoint.
    checkpoint = checkpoint_copy(tiny_chat_dir, folder / "demo-checkpoint", max_new_tokens=LONG_REPLY_TOKENS)
    port = free_port()
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": "127.0.0.1,localhost", "QWEN_DEMO_CHECKPOINT": str(checkpoint), "QWEN_VOCAB_FILE": str(vocab_file),
    }
    command = [sys.executable, str(REPO / "web_demo.py"), "-c", "demo", "--cpu-only",
               "--server-name", "127.0.0.1", "--server-port", str(port)]
    log = folder / "web_demo.log"
    with log.open("w") as output:  # a file, not a pipe: nothing reads it while the tests run
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        yield Server(process, f"http://127.0.0.1:{port}/", log)
    finally:
        stop(process)


@pytest.fixture(scope="module")
def demo_server(demo_server_started: Server) -> Server:
    server = demo_server_started
    wait_until_serving(server.process, server.url, timeout=60, output=server.log.read_text)
    return demo_server_started


@dataclass
class LocalApp:
    url: str
    engine: GenerationEngine


@pytest.fixture(scope="module")
def chat_app(web_demo, tiny_chat_model, tokenizer) -> Iterator[LocalApp]:
    """The page `build_demo` makes, served from this process: greedy replies of REPLY_TOKENS tokens."""
    engine = GenerationEngine(tiny_chat_model, tokenizer, max_batch_size=8)
    demo = web_demo.build_demo(engine, tokenizer, greedy_params(tokenizer, REPLY_TOKENS),
                               model_name="qwen-tiny-random-chat")
    port = free_port()
    # As main() launches it, without holding this thread.
    demo.launch(server_name="127.0.0.1", server_port=port, share=False, ssr_mode=False, prevent_thread_lock=True,
                quiet=True)
    try:
        yield LocalApp(f"http://127.0.0.1:{port}/", engine)
    finally:
        demo.close()
        engine.close()


# --------------------------------------------------------------------------------------------------------------------
# The browser
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def requested() -> list[str]:
    """Every URL any page of this module requested."""
    return []


@pytest.fixture(scope="module")
def browser(demo_server_started):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"needs Chromium at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class ChatTab:
    """One browser tab with its own context, so its own Gradio session."""

    def __init__(self, browser, url: str, requested: list[str]) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 800})
        self.context.on("request", lambda request: requested.append(request.url))
        self.page = self.context.new_page()
        self.closed = False
        self.sent: list[list] = []  # the inputs of each reply event: [textbox, conversation]
        self.page.on("request", self._record)
        self.page.goto(url)
        self.page.wait_for_selector("#msg textarea")

    def _record(self, request) -> None:
        if request.method == "POST" and "/queue/join" in request.url:
            self.sent.append(request.post_data_json["data"])

    def trigger(self, action: Callable[[], None]) -> None:
        """Trigger a reply event and return once the browser has sent it."""
        with self.page.expect_request(lambda request: "/queue/join" in request.url):
            action()

    def ask(self, question: str, press_enter: bool = False) -> None:
        self.page.fill("#msg textarea", question)
        if press_enter:
            self.trigger(lambda: self.page.press("#msg textarea", "Enter"))
        else:
            self.trigger(lambda: self.page.click("#submit-btn"))

    def regenerate(self) -> None:
        self.trigger(lambda: self.page.click("#regen-btn"))

    def wait_finished(self, timeout: float = 30) -> None:
        """Wait until the running reply is complete: the Chatbot's status tracker is hidden again."""
        self.page.wait_for_function(f"document.querySelector(\"{TRACKER}\")?.classList.contains('hide')",
                                    timeout=timeout * 1000)

    def wait_streaming(self, replies: int = 1) -> None:
        """Wait until the `replies`-th reply has begun to show text."""
        self.page.wait_for_function(
            f"document.querySelectorAll(\"{BOT}\")[{replies - 1}]?.innerText.trim().length > 0", timeout=30_000)

    def counts(self) -> tuple[int, int]:
        """(user messages, assistant messages) on the page."""
        return self.page.locator(USER).count(), self.page.locator(BOT).count()

    def last_sent_conversation(self) -> list[tuple[str, str]]:
        """The conversation the last reply event sent, as (role, plain text) pairs."""
        return [(message["role"], "".join(part["text"] for part in message["content"]))
                for message in self.sent[-1][1]]

    def watch_fewest_replies(self) -> None:
        """From now on, keep in `window.fewestReplies` the fewest assistant messages the chat shows at any moment."""
        self.page.evaluate(
            """selector => {
                const count = () => document.querySelectorAll(selector).length;
                window.fewestReplies = count();
                new MutationObserver(() => { window.fewestReplies = Math.min(window.fewestReplies, count()); })
                    .observe(document.querySelector("#chatbot"), {childList: true, subtree: true});
            }""",
            BOT,
        )

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.context.close()


@pytest.fixture
def open_tab(browser, requested) -> Iterator[Callable[[str], ChatTab]]:
    tabs: list[ChatTab] = []

    def open_(url: str) -> ChatTab:
        tabs.append(ChatTab(browser, url, requested))
        return tabs[-1]

    yield open_
    for tab in tabs:
        tab.close()


@pytest.fixture(scope="module")
def expected_reply(tiny_chat_model, tokenizer) -> Callable[..., str]:
    """The local app's reply to a conversation, from transformers' generate() (not the demo's engine)."""

    def reply(question: str, history: list[tuple[str, str]] | None = None) -> str:
        ids = make_context(tokenizer, question, history=history, system=SYSTEM)[1]
        tokens = greedy_reference(tiny_chat_model, tokenizer, ids, REPLY_TOKENS, repetition_penalty=REPETITION_PENALTY)
        return tokenizer.decode(tokens, skip_special_tokens=True, errors="replace").strip()

    return reply


# --------------------------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------------------------


def test_a_two_turn_chat_shows_the_model_replies_and_keeps_plain_text_history(chat_app, open_tab, expected_reply):
    tab = open_tab(chat_app.url)
    page = tab.page
    assert page.locator("#demo-notice").count() == 0  # a real checkpoint gets no random-weights note
    tab.trigger(lambda: page.click("#submit-btn"))  # nothing typed: nothing to answer
    tab.wait_finished()

    tab.ask(MARKDOWN_QUESTION)
    assert tab.sent[-1] == [MARKDOWN_QUESTION, []]
    tab.wait_finished()
    assert tab.counts() == (1, 1)
    assert page.input_value("#msg textarea") == ""
    # Gradio renders the Markdown and the code in the browser ...
    user = page.locator(USER).first
    assert user.locator("strong").inner_text() == "bold"
    assert user.locator("b").inner_text() == "tags"
    assert "print(1 < 2)" in user.locator("pre code").inner_text()
    assert page.locator(BOT).first.inner_text().strip()

    second = "And in one line?"
    tab.ask(second, press_enter=True)
    # ... and the conversation it sends back holds the text as typed and as generated.
    first_reply = expected_reply(MARKDOWN_QUESTION)
    assert tab.last_sent_conversation() == [("user", MARKDOWN_QUESTION), ("assistant", first_reply)]
    assert tab.sent[-1][0] == second
    tab.wait_finished()
    assert tab.counts() == (2, 2)
    if SCREENSHOT is not None:
        page.screenshot(path=str(SCREENSHOT))

    # Regenerate takes the last reply away and answers the last question again, from the history before it.
    tab.watch_fewest_replies()
    tab.regenerate()
    second_reply = expected_reply(second, [(MARKDOWN_QUESTION, first_reply)])
    assert tab.last_sent_conversation()[-1] == ("assistant", second_reply)
    tab.wait_finished()
    assert page.evaluate("window.fewestReplies") == 1
    assert tab.counts() == (2, 2)
    tab.ask("Thanks!")
    assert tab.last_sent_conversation() == [
        ("user", MARKDOWN_QUESTION), ("assistant", first_reply), ("user", second), ("assistant", second_reply),
    ]
    tab.wait_finished()

    # Clear history empties the chat, and the next question starts a new conversation.
    page.click("#clear-btn")
    page.wait_for_function(f"document.querySelectorAll(\"{USER}, {BOT}\").length === 0", timeout=10_000)
    tab.ask("Hello again")
    assert tab.sent[-1][1] == []
    tab.wait_finished()
    assert tab.counts() == (1, 1)
    assert chat_app.engine.running == 0


def test_tabs_chat_independently_at_the_same_time(chat_app, open_tab, expected_reply):
    questions = ["Tab one: what is a llama?", "Tab two: 你好，世界"]
    tabs = [open_tab(chat_app.url) for _ in questions]
    for tab, question in zip(tabs, questions):
        tab.ask(question)  # one right after the other: the engine decodes the two replies together
    for tab in tabs:
        tab.wait_finished()
    for tab, question in zip(tabs, questions):
        assert tab.counts() == (1, 1)
        assert tab.page.locator(USER).first.inner_text().strip() == question
        tab.ask("More, please.")
        assert tab.last_sent_conversation() == [("user", question), ("assistant", expected_reply(question))]
    for tab in tabs:
        tab.wait_finished()


def test_demo_checkpoint_shows_the_random_weights_note(demo_server, open_tab):
    note = open_tab(demo_server.url).page.locator("#demo-notice")
    assert note.is_visible()
    assert "RANDOM weights" in note.inner_text()


def test_stop_and_clear_end_a_long_reply_and_the_engine_goes_idle(demo_server, open_tab):
    tab = open_tab(demo_server.url)
    tab.ask("Tell me a very long story.")
    tab.wait_streaming()
    assert demo_server.cpu_seconds(over=1.0) > 0.6  # generating keeps the server busy

    tab.page.click("#stop-btn")
    tab.wait_finished(timeout=10)
    time.sleep(0.5)
    shown = tab.page.locator(BOT).first.inner_text()
    assert demo_server.cpu_seconds(over=1.5) < 0.3  # the engine stopped, not just the page
    assert tab.page.locator(BOT).first.inner_text() == shown
    assert tab.counts() == (1, 1)  # the partial reply stays ...

    tab.ask("Shorter, please.")
    # ... and is history like any other (the page shows it rendered, so only its presence is compared here).
    (user, asked), (assistant, partial) = tab.last_sent_conversation()
    assert (user, asked, assistant) == ("user", "Tell me a very long story.", "assistant") and partial
    tab.wait_streaming(replies=2)

    # Clear during a reply stops it too, and the chat stays empty.
    tab.page.click("#clear-btn")
    tab.wait_finished(timeout=10)
    time.sleep(0.5)
    assert tab.counts() == (0, 0)
    assert demo_server.cpu_seconds(over=1.5) < 0.3


def test_closing_a_tab_cancels_its_reply(demo_server, open_tab):
    tab = open_tab(demo_server.url)
    tab.ask("Tell me another very long story.")
    tab.wait_streaming()
    tab.close()
    deadline = time.time() + 10
    while demo_server.cpu_seconds(over=1.0) > 0.2:
        assert time.time() < deadline, "the server kept generating for a closed tab"


def test_the_pages_request_nothing_from_other_hosts(demo_server, open_tab, requested):
    # Markdown, code and LaTeX on the page make it load whatever renders them.
    tab = open_tab(demo_server.url)
    tab.ask(MARKDOWN_QUESTION + "\n$$x^2$$")
    tab.wait_streaming()
    tab.page.click("#stop-btn")
    tab.wait_finished(timeout=10)
    assert tab.page.locator(f"{USER} .katex").count() == 1
    hosts = {urlsplit(url).hostname for url in requested if not url.startswith(("data:", "blob:"))}
    assert hosts == {"127.0.0.1"}, sorted(url for url in requested if urlsplit(url).hostname != "127.0.0.1")


# --------------------------------------------------------------------------------------------------------------------
# The reply stream without a browser
# --------------------------------------------------------------------------------------------------------------------


def test_history_is_the_plain_text_of_the_chatbot_messages(web_demo):
    messages = [
        {"role": "user", "content": "a <b>"},  # as a handler returns it
        {"role": "assistant", "content": [{"type": "text", "text": "**b**"}]},  # as the browser sends it back
        {"role": "user", "content": [{"type": "text", "text": "stopped before any text"}]},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    assert web_demo.history_pairs(messages) == [("a <b>", "**b**"), ("stopped before any text", ""), ("c", "d")]
    assert web_demo.without_last_reply(messages) == messages[:4]
    assert web_demo.without_last_reply(messages[:4]) == messages[:4]
    assert web_demo.without_last_reply([]) == []


@pytest.fixture
def engine(tiny_chat_model, tokenizer) -> Iterator[GenerationEngine]:
    engine = GenerationEngine(tiny_chat_model, tokenizer, max_batch_size=2)
    try:
        yield engine
    finally:
        engine.close()


def wait_running(engine: GenerationEngine, count: int) -> None:
    deadline = time.time() + 5
    while engine.running > count:
        assert time.time() < deadline, "the engine kept generating an abandoned reply"
        time.sleep(0.01)


LONG_QUESTION = [{"role": "user", "content": "Tell me a very long story."}]


def test_a_closed_reply_stream_frees_its_engine_slot(web_demo, engine, tokenizer):
    # Gradio closes the generator of an event whose tab went away.
    chat = web_demo.WebChat(engine, tokenizer, greedy_params(tokenizer, LONG_REPLY_TOKENS))
    stream = chat.reply(LONG_QUESTION, session="a")
    conversation = next(stream)
    assert conversation[0] == LONG_QUESTION[0] and conversation[1]["role"] == "assistant"
    assert engine.running == 1
    stream.close()
    wait_running(engine, 0)
    assert not chat.stop("a")  # nothing is left running for the session


def test_stop_and_clear_end_a_sessions_reply(web_demo, engine, tokenizer):
    chat = web_demo.WebChat(engine, tokenizer, greedy_params(tokenizer, LONG_REPLY_TOKENS))
    stream = chat.reply(LONG_QUESTION, session="a")
    shown = [next(stream)]
    assert not chat.stop("b")  # another session's Stop changes nothing
    time.sleep(0.2)
    assert engine.running == 1
    assert chat.stop("a")
    shown.extend(stream)  # the stream ends by itself, with the reply as far as it got
    wait_running(engine, 0)
    assert shown[-1][:1] == LONG_QUESTION and shown[-1][1]["content"]

    stream = chat.reply(LONG_QUESTION, session="a")
    next(stream)
    assert chat.stop("a", clear=True)
    assert list(stream)[-1] == []  # its last output empties the chat
    wait_running(engine, 0)


def test_stopping_one_sessions_reply_leaves_the_others_intact(web_demo, engine, tiny_chat_model, tokenizer):
    long_chat = web_demo.WebChat(engine, tokenizer, greedy_params(tokenizer, LONG_REPLY_TOKENS))
    short_chat = web_demo.WebChat(engine, tokenizer, greedy_params(tokenizer, 40))
    question = "Tell me a short story."
    first = long_chat.reply(LONG_QUESTION, session="a")
    next(first)  # admitted first: row 0 of the engine's cache
    second = short_chat.reply([{"role": "user", "content": question}], session="b")
    shown = [next(second)]
    long_chat.stop("a")
    shown.extend(second)
    ids = make_context(tokenizer, question, system=SYSTEM)[1]
    tokens = greedy_reference(tiny_chat_model, tokenizer, ids, 40, repetition_penalty=REPETITION_PENALTY)
    assert shown[-1][-1]["content"] == tokenizer.decode(tokens, skip_special_tokens=True, errors="replace").strip()
