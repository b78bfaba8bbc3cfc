"""Throughput of `openai_api.py` under concurrent streaming clients.

    python bench/bench_server.py            # 1, 4, 8 and 16 clients on the mid-size random checkpoint, CPU
    python bench/bench_server.py --quick    # fewer tokens, for a smoke run

The server runs as users run it (a subprocess of `openai_api.py`), and every client is the real `openai` SDK
(`AsyncOpenAI`, all clients on one event loop so that client threads do not take the server's CPU) streaming a chat
completion. Reported per concurrency level: aggregate completion tokens per second (from the
`usage` the server reports), its ratio to one client in the same run, time to first token and the gap between
streamed chunks (p50 / p95).

A second table compares, in the same run and server, greedy decoding (`temperature=0`; the checkpoint's
repetition_penalty still applies) with the checkpoint's own sampling (no sampling fields sent, so the server applies
`generation_config.json`: top_p 0.8, repetition_penalty 1.1) at `--sampling-levels` clients: the ratio is sampled /
greedy aggregate tokens per second.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from openai import AsyncOpenAI

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qwen.checkpoint import write_random_checkpoint  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(folder: str, port: int, max_batch_size: int, extra_args: list[str]) -> subprocess.Popen:
    command = [sys.executable, str(REPO / "openai_api.py"), "-c", folder, "--cpu-only", "--server-port", str(port),
               "--max-batch-size", str(max_batch_size), *extra_args]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return wait_until_serving(process, port)


def wait_until_serving(process: subprocess.Popen, port: int, log: Path | None = None) -> subprocess.Popen:
    """`process` once its /health answers; SystemExit (with the tail of `log`) if it exits or takes 3 minutes."""

    def tail() -> str:
        return f":\n{log.read_text()[-3000:]}" if log is not None else ""

    deadline = time.time() + 180
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited ({process.returncode}){tail()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"the server did not start{tail()}")


GREEDY = {"temperature": 0}
CHECKPOINT_SAMPLING: dict = {}  # nothing sent: the server samples as the checkpoint's generation_config says
SAMPLINGS = {"greedy": GREEDY, "checkpoint": CHECKPOINT_SAMPLING}


async def one_client(client: AsyncOpenAI, index: int, max_tokens: int, sampling: dict) -> dict:
    start = time.perf_counter()
    stamps, tokens = [], 0
    stream = await client.chat.completions.create(
        model="qwen", messages=[{"role": "user", "content": f"Client {index}: tell me a long story."}],
        max_tokens=max_tokens, stream=True, stream_options={"include_usage": True}, **sampling,
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft": stamps[0] - start if stamps else float("nan"), "gaps": gaps, "tokens": tokens}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_level(client: AsyncOpenAI, clients: int, max_tokens: int, sampling: dict) -> dict:
    start = time.perf_counter()
    results = await asyncio.gather(*[one_client(client, i, max_tokens, sampling) for i in range(clients)])
    wall = time.perf_counter() - start
    gaps = [gap for result in results for gap in result["gaps"]]
    ttfts = [result["ttft"] for result in results]
    return {
        "tokens_per_s": sum(result["tokens"] for result in results) / wall,
        "ttft_p50": statistics.median(ttfts), "ttft_p95": percentile(ttfts, 0.95),
        "gap_p50": percentile(gaps, 0.5), "gap_p95": percentile(gaps, 0.95),
    }


async def measure(port: int, cases: list[tuple[str, int]], max_tokens: int, rounds: int) -> dict[tuple[str, int], dict]:
    """Every case (sampling name, clients) `rounds` times, interleaved so that a slow spell of the machine hits all
    cases alike; the round with the median tokens/s is reported per case."""
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    for sampling in dict.fromkeys(name for name, _ in cases):
        await run_level(client, 1, 4, SAMPLINGS[sampling])  # warm-up
    runs: dict[tuple[str, int], list[dict]] = {case: [] for case in cases}
    for _ in range(rounds):
        for sampling, clients in cases:
            runs[sampling, clients].append(await run_level(client, clients, max_tokens, SAMPLINGS[sampling]))
    await client.close()
    return {case: sorted(rows, key=lambda row: row["tokens_per_s"])[len(rows) // 2] for case, rows in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--levels", default="1,4,8,16", help="comma-separated client counts")
    parser.add_argument("--server-args", default="", help="more openai_api.py flags, e.g. --server-args=--disable-gc")
    parser.add_argument("--rounds", type=int, default=3, help="runs per level; the median is reported")
    parser.add_argument("--sampling-levels", default="1,8",
                        help="client counts at which greedy and the checkpoint's sampling are compared ('' for none)")
    args = parser.parse_args()
    levels = [int(level) for level in args.levels.split(",")]
    sampling_levels = [int(level) for level in args.sampling_levels.split(",") if level]
    max_tokens = 16 if args.quick else 48
    cases = [("greedy", clients) for clients in levels]
    cases += [("greedy", clients) for clients in sampling_levels if clients not in levels]
    cases += [("checkpoint", clients) for clients in sampling_levels]

    with tempfile.TemporaryDirectory() as folder:
        write_random_checkpoint(folder, size="mid")
        port = free_port()
        server = start_server(folder, port, max(levels + sampling_levels), shlex.split(args.server_args))
        try:
            results = asyncio.run(measure(port, cases, max_tokens, 1 if args.quick else args.rounds))
        finally:
            server.terminate()
            server.wait(10)

    rows = {clients: results["greedy", clients] for clients in levels}
    single = rows[levels[0]]["tokens_per_s"]
    print(f"mid checkpoint, {max_tokens} tokens per client, greedy, {os.cpu_count()} CPUs, median of "
          f"{1 if args.quick else args.rounds} rounds\n")
    print("| clients | tokens/s (all clients) | vs 1 client | first token p50 / p95, s | chunk gap p50 / p95, s |")
    print("|---:|---:|---:|---:|---:|")
    for clients, row in rows.items():
        print(f"| {clients} | {row['tokens_per_s']:.1f} | {row['tokens_per_s'] / single:.2f}x | "
              f"{row['ttft_p50']:.2f} / {row['ttft_p95']:.2f} | {row['gap_p50']:.3f} / {row['gap_p95']:.3f} |")
    if sampling_levels:
        print("\ngreedy (temperature 0) against the checkpoint's generation_config (top_p 0.8, "
              "repetition_penalty 1.1), same run\n")
        print("| clients | greedy tokens/s | checkpoint sampling tokens/s | sampled / greedy |")
        print("|---:|---:|---:|---:|")
        for clients in sampling_levels:
            greedy, sampled = results["greedy", clients]["tokens_per_s"], results["checkpoint", clients]["tokens_per_s"]
            print(f"| {clients} | {greedy:.1f} | {sampled:.1f} | {sampled / greedy:.2f}x |")


if __name__ == "__main__":
    main()
