"""Serve a Qwen checkpoint behind an OpenAI-compatible API.

    python openai_api.py -c Qwen-7B-Chat [--server-name 127.0.0.1] [--server-port 8000] [--cpu-only]
                         [--api-key KEY | --api-auth user:pass] [--model-name qwen] [--strict-model-name]
                         [--max-batch-size 8]
    python openai_api.py -c demo        # a tiny random-weight model: no download, no GPU

SIGTERM or Ctrl+C stops the server within seconds: requests still generating get a 503 error, retried by OpenAI SDKs.
"""

from __future__ import annotations

import argparse
import logging

from qwen.engine import GenerationEngine
from qwen.loading import add_model_arguments, load_from_args
from qwen.server import ServerSettings, serve

DEFAULTS = ServerSettings()


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and each option's default after its help when it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default in (None, False):  # "(default: None)" would say nothing
            return action.help
        if "(default:" in (action.help or ""):  # the shared loading options say theirs themselves
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, ServerSettings]:
    """The command line, and the server settings it asks for. Settings that cannot work end the program with one line,
    before the model is loaded."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--server-name", default="127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    parser.add_argument("--server-port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--api-key", help="require `Authorization: Bearer KEY` (what OpenAI SDKs send)")
    parser.add_argument("--api-auth", help="require HTTP basic auth, given as user:password")
    parser.add_argument("--model-name", default=DEFAULTS.model_name,
                        help="the model id that /v1/models lists (requests may name any other model)")
    parser.add_argument("--strict-model-name", action="store_true",
                        help="refuse requests naming another model than --model-name (404 model_not_found)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together; more wait in line")
    parser.add_argument("--compile", action="store_true",
                        help="decode with the torch.compile'd fixed-shape step (same tokens; the first steps at each batch size wait for a compilation, tens of seconds on a CPU)")
    parser.add_argument("--cors-origin", action="append", dest="cors_origins",
                        help="allowed browser origin (repeatable); default any origin, without credentials")
    parser.add_argument("--disable-gc", action="store_true",
                        help="skip garbage collection and CUDA cache release when the server goes idle")
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULTS.max_request_bytes,
                        help="larger request bodies are refused with 413 before they are read")
    parser.add_argument("--max-choices", type=int, default=DEFAULTS.max_choices,
                        help="most choices one request may ask for: n, times the prompts of a /v1/completions list")
    parser.add_argument("--body-timeout", type=float, default=DEFAULTS.body_timeout_s,
                        help="seconds a request body may take to arrive before the request gets 408")
    parser.add_argument("--shutdown-timeout", type=float, default=DEFAULTS.shutdown_timeout_s,
                        help="on SIGTERM, seconds open connections get to finish after every request is cancelled")
    args = parser.parse_args(argv)
    try:
        api_auth = None
        if args.api_auth is not None:
            if ":" not in args.api_auth:
                raise ValueError("--api-auth takes user:password.")
            api_auth = tuple(args.api_auth.split(":", 1))
        settings = ServerSettings(
            model_name=args.model_name,
            strict_model_name=args.strict_model_name,
            api_key=args.api_key,
            api_auth=api_auth,
            cors_origins=args.cors_origins or ["*"],
            cors_allow_credentials=bool(args.cors_origins),
            collect_garbage=not args.disable_gc,
            max_request_bytes=args.max_request_bytes,
            max_choices=args.max_choices,
            body_timeout_s=args.body_timeout,
            shutdown_timeout_s=args.shutdown_timeout,
        )
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    if args.max_batch_size < 1:
        parser.exit(2, f"{parser.prog}: error: --max-batch-size must be at least 1.\n")
    return args, settings


def main(argv: list[str] | None = None) -> None:
    args, settings = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model, tokenizer = load_from_args(args)
    engine = GenerationEngine(model, tokenizer, max_batch_size=args.max_batch_size, compile=args.compile)
    try:
        serve(engine, settings, args.server_name, args.server_port)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
