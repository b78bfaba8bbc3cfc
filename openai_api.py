"""Serve a Qwen checkpoint behind an OpenAI-compatible API.

    python openai_api.py -c Qwen-7B-Chat [--server-name 127.0.0.1] [--server-port 8000] [--cpu-only]
                         [--api-key KEY | --api-auth user:pass] [--model-name qwen] [--max-batch-size 8]
    python openai_api.py -c demo        # a tiny random-weight model: no download, no GPU
"""

from __future__ import annotations

import argparse
import logging

import uvicorn

from qwen.engine import GenerationEngine
from qwen.loading import add_model_arguments, load_from_args
from qwen.server import ServerSettings, create_app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--server-name", default="127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    parser.add_argument("--server-port", type=int, default=8000)
    parser.add_argument("--api-key", help="require `Authorization: Bearer KEY` (what OpenAI SDKs send)")
    parser.add_argument("--api-auth", help="require HTTP basic auth, given as user:password")
    parser.add_argument("--model-name", default="qwen", help="the model id that /v1/models lists and requests name")
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together; more wait in line")
    parser.add_argument("--cors-origin", action="append", dest="cors_origins",
                        help="allowed browser origin (repeatable); default any origin, without credentials")
    parser.add_argument("--disable-gc", action="store_true",
                        help="skip garbage collection and CUDA cache release when the server goes idle")
    args = parser.parse_args(argv)
    if args.api_auth is not None and ":" not in args.api_auth:
        parser.error("--api-auth takes user:password")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model, tokenizer = load_from_args(args)
    engine = GenerationEngine(model, tokenizer, max_batch_size=args.max_batch_size)
    settings = ServerSettings(
        model_name=args.model_name,
        api_key=args.api_key,
        api_auth=tuple(args.api_auth.split(":", 1)) if args.api_auth else None,
        cors_origins=args.cors_origins or ["*"],
        cors_allow_credentials=bool(args.cors_origins),
        collect_garbage=not args.disable_gc,
    )
    try:
        uvicorn.run(create_app(engine, settings), host=args.server_name, port=args.server_port)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
