"""Chat with a Qwen (v1) chat checkpoint in the browser.

    python web_demo.py -c Qwen-7B-Chat [--cpu-only] [--share] [--inbrowser] [--server-port 8000]
                       [--server-name 127.0.0.1]
    python web_demo.py -c demo        # a tiny random-weight model: no download, no GPU, replies are noise

Each browser tab holds its own conversation (the Chatbot's value), and all tabs share one `GenerationEngine`, which
decodes their replies together. The page loads nothing from the internet: no analytics, no web fonts, and a public
share link only with --share. Nor can a message make it load anything: the page's Content-Security-Policy lets the
browser fetch, send or frame nothing from any other origin, and a message cannot cover the page or show a form.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# gradio and huggingface_hub read these when they are imported (huggingface_hub comes in with transformers too), so
# they are set before the imports below. A value set in the environment is kept.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402

from qwen.chat_turn import ChatTurn, SamplingParams, chat_turn  # noqa: E402
from qwen.engine import GenerationEngine, RequestHandle  # noqa: E402
from qwen.loading import (  # noqa: E402
    DEMO_NOTICE, USAGE_NOTICE, add_model_arguments, is_demo_checkpoint, load_from_args,
)
from qwen.qwen_generation_utils import DEFAULT_SYSTEM_PROMPT, HistoryType  # noqa: E402


ChatMessages = list[dict[str, Any]]  # the Chatbot's value: {"role": "user" | "assistant", "content": ...} dicts
ERROR_TITLE = "The reply failed"  # the metadata title that marks an error shown in the chat (not a reply)


# --------------------------------------------------------------------------------------------------------------------
# The conversation as the Chatbot holds it, and as the model sees it
# --------------------------------------------------------------------------------------------------------------------


def message_text(message: dict[str, Any]) -> str:
    """The plain text of a Chatbot message.

    Handlers put strings in; the browser sends lists of parts (`{"type": "text", "text": ...}`) back. Either way it is
    the text as typed or generated: Gradio renders the Markdown in the browser and stores nothing else.
    """
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or [] if isinstance(part, dict))


def error_message(error: str) -> dict[str, Any]:
    """An error shown in the chat where the reply would be (Gradio draws a titled box)."""
    return {"role": "assistant", "content": f"{error} This question is left out of the conversation the model sees.",
            "metadata": {"title": ERROR_TITLE}}


def is_error_message(message: dict[str, Any]) -> bool:
    return (message.get("metadata") or {}).get("title") == ERROR_TITLE


def history_pairs(messages: ChatMessages) -> HistoryType:
    """(query, reply) pairs for `make_context`; a question whose reply was stopped before any text pairs with "", and
    a question whose reply failed is left out, as the command-line demo leaves it out."""
    pairs: HistoryType = []
    for message in messages:
        if is_error_message(message):
            if pairs:
                pairs.pop()
        elif message.get("role") == "user":
            pairs.append((message_text(message), ""))
        elif message.get("role") == "assistant" and pairs:
            query, reply = pairs[-1]
            pairs[-1] = (query, reply + message_text(message))
    return pairs


def without_last_reply(messages: ChatMessages) -> ChatMessages:
    """The conversation up to and including its last question: what Regenerate answers again."""
    end = len(messages)
    while end and messages[end - 1].get("role") != "user":
        end -= 1
    return list(messages[:end])


class WebChat:
    """Streams replies through the one shared engine, and stops the replies of the browser session that asks.

    Stop and Clear do not cancel the Gradio event: they cancel the session's request in the engine, and the reply's
    stream then ends by itself, leaving the reply as far as it got (Stop) or an empty chat (Clear). Whatever a stream
    outputs last is what the page keeps, so the stream itself must empty the chat; Gradio's `cancels=` races with
    that last output and now and then leaves the Chatbot showing "Error" (gradio 6.31).
    """

    def __init__(
        self,
        engine: GenerationEngine,
        tokenizer: Any,
        generation_config: Any,
        system: str = DEFAULT_SYSTEM_PROMPT,
    ) -> None:
        """`generation_config` (the checkpoint's, or any object with its fields) decides how every reply is sampled
        and how much history its prompt keeps; a value the engine would refuse raises SamplingParamError here."""
        SamplingParams.from_generation_config(generation_config)
        self.engine = engine
        self.tokenizer = tokenizer
        self.generation_config = generation_config
        self.system = system
        self._lock = threading.Lock()
        # session hash -> its running requests, each with whether Clear was pressed while it ran
        self._running: dict[str, dict[RequestHandle, bool]] = {}

    def turn(self, messages: ChatMessages) -> ChatTurn:
        """The library's chat turn answering the last message, the earlier ones as its history."""
        *earlier, question = messages
        return chat_turn(self.tokenizer, message_text(question), history_pairs(earlier), self.system,
                         self.generation_config, self.engine.max_context)

    def reply(self, messages: ChatMessages, session: str = "") -> Iterator[ChatMessages]:
        """Answer the last message of `messages`, yielding the conversation with the reply so far as it grows.

        Closing the generator early cancels the request in the engine, which frees its slot at the next step (Gradio
        closes it when the tab that started it goes away). A reply that fails, or a question the engine refuses,
        ends with an error message in place of the reply; the tab's chat goes on, and other tabs never notice.
        """
        turn = self.turn(messages)
        try:
            handle = self.engine.submit(turn.prompt_ids, turn.sampling_params())
        except ValueError as error:  # one question longer than the model's context
            yield [*messages, error_message(str(error))]
            return
        with self._lock:
            self._running.setdefault(session, {})[handle] = False
        reply = ""
        try:
            for event in handle:
                if handle.cancelled.is_set():
                    break  # stopped: the reply stays as last shown
                if event.finish_reason == "error":
                    yield [*messages, error_message(f"Generation failed: {event.error}.")]
                    break
                reply += event.text
                # Stripped as model.chat() strips its replies, so that the history holds what chat()'s would.
                yield [*messages, {"role": "assistant", "content": reply.strip()}]
        finally:
            handle.cancel()  # a no-op once the reply is complete
            with self._lock:
                running = self._running.get(session, {})
                cleared = running.pop(handle, False)
                if not running:
                    self._running.pop(session, None)
        if cleared:
            yield []

    def stop(self, session: str, clear: bool = False) -> bool:
        """Stop the session's replies (`clear`: and have them empty the chat); False if none was running."""
        with self._lock:
            running = self._running.get(session, {})
            for handle in running:
                running[handle] |= clear
                handle.cancel()
            return bool(running)


# --------------------------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------------------------


def _gradio_page_style_hashes() -> list[str]:
    """CSP sources for the style attributes of Gradio's own page template (its <html>, <body> and <gradio-app> are
    laid out by them): those exact values may apply, and no style attribute written in a message can."""
    template = Path(gr.__file__).parent / "templates" / "frontend" / "index.html"
    try:
        values = re.findall(r'style="([^"]*)"', template.read_text(encoding="utf-8"))
    except OSError:  # another Gradio layout: its page loses some flex layout, messages are no less contained
        return []
    return [f"'sha256-{base64.b64encode(hashlib.sha256(value.encode()).digest()).decode()}'" for value in values]


# The browser itself refuses whatever a message could make it load, send or frame from another origin: Markdown and
# HTML images, CSS url(), SVG references, iframes, objects, forms, scripts. Gradio's sanitizer removes scripts and
# event handlers but keeps images, forms and style attributes, so this header is the boundary. Gradio needs its inline
# scripts (the page's config) and the <style> elements it writes; everything else comes from the page's own origin.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self' 'unsafe-inline'",
    "style-src 'self' 'unsafe-inline'",
    # No style attribute in markup applies but those of Gradio's page template. (Gradio styles its components
    # through the CSSOM, which this does not govern.)
    " ".join(["style-src-attr 'unsafe-hashes'", *_gradio_page_style_hashes()]),
    "img-src 'self' data: blob:",
    "media-src 'self' data: blob:",
    "font-src 'self' data:",
    "connect-src 'self'",
    "frame-src 'none'",
    "object-src 'none'",
    "form-action 'none'",
    "base-uri 'self'",
])

# A message is a box of its own: nothing in it paints outside it, not even with position: fixed (from one of Gradio's
# own classes, say). Form controls from a message are not shown: nothing in a reply asks for input. (The copy button
# of a code block is Gradio's, and a task list's checkbox is disabled.)
PAGE_CSS = """
#header { text-align: center; }
#chatbot .message-content { contain: paint; }
#chatbot .message-content :is(form, select, textarea, input:not([type="checkbox"][disabled]),
                              button:not(.copy_code_button)) { display: none !important; }
"""


class ContentSecurityPolicy:
    """ASGI middleware that sends CONTENT_SECURITY_POLICY with every HTTP response (streamed ones included)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_policy(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                header = (b"content-security-policy", CONTENT_SECURITY_POLICY.encode())
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        await self.app(scope, receive, send_with_policy)


def launch_demo(demo: gr.Blocks, **launch_options: Any) -> Any:
    """`demo.launch` with what the page's safety rests on: the Content-Security-Policy header and PAGE_CSS."""
    from starlette.middleware import Middleware

    # ssr_mode=False: server-side rendering would start a Node server, which this page does not need.
    return demo.launch(css=PAGE_CSS, app_kwargs={"middleware": [Middleware(ContentSecurityPolicy)]}, ssr_mode=False,
                       **launch_options)


# The models and code the original page linked to.
MODEL_LINKS = " | ".join(
    [f"{name}: [ModelScope](https://modelscope.cn/models/qwen/{name}/summary), "
     f"[Hugging Face](https://huggingface.co/Qwen/{name})" for name in ("Qwen-7B", "Qwen-7B-Chat", "Qwen-14B",
                                                                     "Qwen-14B-Chat")]
    + ["[GitHub](https://github.com/QwenLM/Qwen)"]
)
# Display math first, so that `$$` is not read as two empty inline formulas.
LATEX_DELIMITERS = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "\\[", "right": "\\]", "display": True},
    {"left": "$", "right": "$", "display": False},
    {"left": "\\(", "right": "\\)", "display": False},
]


def build_demo(
    engine: GenerationEngine,
    tokenizer: Any,
    generation_config: Any,
    model_name: str = "Qwen",
    demo_notice: bool = False,
    system: str = DEFAULT_SYSTEM_PROMPT,
) -> gr.Blocks:
    """The chat page. Each tab's conversation lives in its Chatbot; all that tabs share is the engine."""
    chat = WebChat(engine, tokenizer, generation_config, system=system)
    # The default theme's fonts are files Gradio serves itself (no font CDN), so the page stays offline as it is.
    with gr.Blocks(title="Qwen-Chat Bot", analytics_enabled=False) as demo:
        # The original page's header (without its logo, which came from another host) and model links.
        gr.Markdown(f"# Qwen-Chat Bot\nA chat with `{model_name}`, a Qwen-Chat model made by Alibaba Cloud. "
                    f"（与 Qwen-Chat 模型 `{model_name}` 聊天的网页演示。）\n\n{MODEL_LINKS}", elem_id="header")
        if demo_notice:
            gr.Markdown(f"> ⚠️ **Random weights.** {DEMO_NOTICE}", elem_id="demo-notice")
        # sanitize_html (Gradio's default, stated here): scripts, event handlers and javascript: links are removed.
        # LaTeX between the delimiters the original page rendered is typeset here, by Gradio's KaTeX.
        chatbot = gr.Chatbot(elem_id="chatbot", label="Qwen-Chat", height=460, sanitize_html=True,
                             latex_delimiters=LATEX_DELIMITERS)
        # As the original's: two lines high, Enter starts a new line, and Submit sends.
        message = gr.Textbox(elem_id="msg", label="Input", lines=2)
        with gr.Row():
            clear_btn = gr.Button("🧹 Clear History (清除历史)", elem_id="clear-btn")
            submit_btn = gr.Button("🚀 Submit (发送)", elem_id="submit-btn")
            regen_btn = gr.Button("🤔️ Regenerate (重试)", elem_id="regen-btn")
            stop_btn = gr.Button("⏹️ Stop (停止)", variant="stop", elem_id="stop-btn")

        def respond(text: str, messages: ChatMessages, event: gr.EventData, request: gr.Request
                    ) -> Iterator[tuple[Any, Any]]:
            """Answer a new question (Submit) or the last one again (Regenerate)."""
            if event.target is regen_btn:
                messages = without_last_reply(messages)
                box = gr.skip()  # leave what is being typed alone
            else:
                messages = [*messages, {"role": "user", "content": text}]
                box = ""
            if not messages or not message_text(messages[-1]).strip():
                yield gr.skip(), gr.skip()  # nothing typed, or nothing to regenerate
                return
            yield box, messages
            for shown in chat.reply(messages, request.session_hash):
                # The textbox is skipped: setting it with every token would wipe out the next question being typed.
                yield gr.skip(), shown

        # One listener for both buttons, so that trigger_mode="once" ignores them while a reply streams: a tab never
        # streams two replies into one conversation. concurrency_limit lets the tabs' replies run at once, for the
        # engine to batch (Gradio's default is one at a time). The events are the page's, not an API.
        gr.on(
            [submit_btn.click, regen_btn.click], respond, [message, chatbot], [message, chatbot],
            trigger_mode="once", concurrency_limit=engine.max_batch_size, api_visibility="private",
        )

        def stop(request: gr.Request) -> None:
            chat.stop(request.session_hash)

        def clear(request: gr.Request) -> Any:
            # A running reply empties the chat as its stream ends; otherwise it is emptied here.
            return gr.skip() if chat.stop(request.session_hash, clear=True) else []

        # queue=False: these run at once, beside the reply they stop.
        stop_btn.click(stop, None, None, queue=False, api_visibility="private")
        clear_btn.click(clear, None, chatbot, queue=False, api_visibility="private")
        chatbot.clear(clear, None, chatbot, queue=False, api_visibility="private")  # the Chatbot's own trash icon
        demo.unload(stop)  # a closed or reloaded tab
        gr.Markdown(USAGE_NOTICE.replace("\n", "\n\n"), elem_id="usage-notice")
    return demo


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


DEFAULT_PORT = 8000
DEFAULT_HOST = "127.0.0.1"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--share", action="store_true",
                        help="also serve the page through a public gradio.live link (off by default)")
    parser.add_argument("--inbrowser", action="store_true",
                        help="open the page in the default browser (off by default)")
    parser.add_argument("--server-port", type=int, default=DEFAULT_PORT,
                        help=f"port to listen on (default {DEFAULT_PORT})")
    parser.add_argument("--server-name", default=DEFAULT_HOST,
                        help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0 for all)")
    parser.add_argument("--compile", action="store_true",
                        help="decode with the torch.compile'd fixed-shape step (same tokens; the first steps at each batch size wait for a compilation, tens of seconds on a CPU)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    model, tokenizer = load_from_args(args)
    generation_config = model.generation_config
    if getattr(generation_config, "chat_format", "chatml") != "chatml":
        raise SystemExit(f"error: {args.checkpoint_path} is a base model (chat_format "
                         f"{generation_config.chat_format!r}); the web demo needs a -Chat checkpoint.")
    try:
        SamplingParams.from_generation_config(generation_config)
    except ValueError as error:  # every tab's every reply would fail with it
        raise SystemExit(f"error: the generation settings of {args.checkpoint_path} (generation_config.json) are "
                         f"unusable: {error}") from None
    engine = GenerationEngine(model, tokenizer, max_batch_size=8, compile=args.compile)
    demo_notice = is_demo_checkpoint(args.checkpoint_path)
    demo = build_demo(
        engine, tokenizer, generation_config,
        model_name="demo" if demo_notice else Path(args.checkpoint_path).name,
        demo_notice=demo_notice,
    )
    try:
        launch_demo(demo, share=args.share, inbrowser=args.inbrowser, server_name=args.server_name,
                    server_port=args.server_port)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
