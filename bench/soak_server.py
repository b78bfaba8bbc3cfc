"""Soak test of `openai_api.py`: minutes of benign and hostile traffic at once, from real clients.

    python bench/soak_server.py                   # 2 minutes of mixed traffic on the tiny random checkpoint, CPU
    python bench/soak_server.py --minutes 30      # a long run
    python bench/soak_server.py --minutes 0.5     # a smoke run

The server runs as users run it: a subprocess of `openai_api.py` on 127.0.0.1, serving a random-weight checkpoint that
`qwen.checkpoint` writes (`--size`), with an API key and `--body-timeout 5` (so that slow bodies end within the run);
every other limit is the default. Benign clients (the `openai` SDK: plain and streamed chat, n=2, a completions list)
first run alone (a quarter of --minutes, for their latency without hostile neighbours), then together with hostile
clients (the SDK, raw httpx and raw sockets), a fixed number of each on one event loop, until the time is up. Hostile
cases:

    extreme_sampling   temperature 1e-39, repetition_penalty 1e-300, seed 2**64, max_tokens 10**9, n 10**6 ...
    disconnect_plain   a non-streaming request for 16 long choices, the socket closed after 0.05-1 s
    disconnect_stream  a long stream read for a few chunks, then closed
    oversized_body     a body past the limit with its Content-Length (413), and chunked without one (413)
    large_prompt       a prompt of 1 MB, under the limit: tokenized off the event loop, then refused (400)
    malformed_json     `{not json`, wrong types, binary garbage (400)
    huge_choices       a completions list of 100 prompts with n=16 (400)
    bad_auth           no key, a wrong key, garbage basic auth, a 10 kB key (401)
    slowloris          a body declared and never finished: 408 once the body timeout passes

Each hostile case has the answers it may get (e.g. 200 or 400 for extreme sampling values); any other answer, a 5xx
or a dropped connection is counted as unexpected. Reported: benign success rate (must be 100 %) and latency (p50,
p95, max; alone and under hostile load), /health latency under load, the server's RSS (from /proc: after warm-up, at
the start of the mixed traffic, every 10 s, at the end, peak), slots busy and requests queued once the traffic stops
(from /health) and how long they took to drain, unexpected hostile answers, tracebacks in the server's log, and how
SIGTERM then stops it (seconds, exit status). A Markdown table goes to stdout, everything as JSON to bench/results/
(git-ignored). The exit status is 1 if any of these is not as it must be. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from openai import AsyncOpenAI

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_server import free_port, percentile, wait_until_serving  # noqa: E402
from qwen.checkpoint import write_random_checkpoint  # noqa: E402
from qwen.server import ServerSettings  # noqa: E402

API_KEY = "sk-soak"
MODEL = "qwen"
BODY_TIMEOUT_S = 5.0
MAX_REQUEST_BYTES = ServerSettings().max_request_bytes  # the server runs with the default
MAX_CHOICES = ServerSettings().max_choices
LONG_TOKENS = 900  # what abandoned requests ask for; the tiny checkpoint's context is 1024 with the prompt


# ---------------------------------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------------------------------


def start_server(folder: Path, port: int, log: Path, max_batch_size: int) -> subprocess.Popen:
    command = [sys.executable, str(REPO / "openai_api.py"), "-c", str(folder), "--cpu-only", "--server-port", str(port),
               "--api-key", API_KEY, "--model-name", MODEL, "--max-batch-size", str(max_batch_size),
               "--body-timeout", str(BODY_TIMEOUT_S)]
    with log.open("w") as output:  # a file, not a pipe: an unread pipe fills with access-log lines and blocks
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return wait_until_serving(process, port, log)


def memory_kib(pid: int) -> dict[str, int]:
    """The process's resident set now (VmRSS) and at its peak (VmHWM), in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


# ---------------------------------------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    benign_latencies: list[float] = field(default_factory=list)
    benign_failures: list[str] = field(default_factory=list)
    benign_kinds: Counter = field(default_factory=Counter)
    hostile: dict[str, Counter] = field(default_factory=dict)  # case -> answer -> count
    unexpected: list[str] = field(default_factory=list)
    health_latencies: list[float] = field(default_factory=list)
    rss_samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds into the run, KiB)

    def hostile_answer(self, case: str, answer: str, expected: set[str]) -> None:
        self.hostile.setdefault(case, Counter())[answer] += 1
        if answer not in expected:
            self.unexpected.append(f"{case}: {answer}")


class Traffic:
    """Every kind of client, sharing one SDK client, one httpx client and the raw-socket helpers."""

    def __init__(self, port: int, tally: Tally) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.tally = tally
        self.sdk = AsyncOpenAI(base_url=f"{self.base}/v1", api_key=API_KEY, max_retries=0, timeout=300)
        self.http = httpx.AsyncClient(base_url=self.base, timeout=300, headers={"Authorization": f"Bearer {API_KEY}"})
        self.oversized = b'{"prompt": "' + b"a " * (MAX_REQUEST_BYTES // 2) + b'"}'
        self.large_text = " ".join(f"w{i % 5000}" for i in range(200_000))[: 2**20]

    async def close(self) -> None:
        await self.sdk.close()
        await self.http.aclose()

    # Benign: must all succeed -------------------------------------------------------------------------------------

    async def benign(self, rng: random.Random) -> None:
        kind = rng.choice(["chat", "chat_stream", "chat_n2", "completions_list"])
        question = f"Question {rng.randrange(10**6)}: tell me something."
        messages = [{"role": "user", "content": question}]
        started = time.perf_counter()
        try:
            if kind == "chat":
                reply = await self.sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                                               temperature=rng.choice([0, 0.7]))
                check(len(reply.choices) == 1 and reply.choices[0].finish_reason in ("stop", "length"), reply)
                check(reply.usage is not None and reply.usage.total_tokens > 0, reply)
            elif kind == "chat_stream":
                stream = await self.sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                                                stream=True, stream_options={"include_usage": True})
                finishes, usage = [], None
                async for chunk in stream:
                    finishes += [c.finish_reason for c in chunk.choices if c.finish_reason]
                    usage = chunk.usage or usage
                check(len(finishes) == 1 and usage is not None, (finishes, usage))
            elif kind == "chat_n2":
                reply = await self.sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, n=2,
                                                               temperature=0.8, seed=rng.randrange(1000))
                check([c.index for c in reply.choices] == [0, 1], reply)
            else:
                reply = await self.sdk.completions.create(model=MODEL, prompt=[question, "Once upon a time"],
                                                          max_tokens=8, temperature=0)
                check(len(reply.choices) == 2 and all(c.finish_reason for c in reply.choices), reply)
        except Exception as error:  # every failure is counted and its first lines reported
            self.tally.benign_failures.append(f"{kind}: {type(error).__name__}: {str(error)[:300]}")
        else:
            self.tally.benign_latencies.append(time.perf_counter() - started)
        self.tally.benign_kinds[kind] += 1

    # Hostile: may fail, but only in the ways expected ---------------------------------------------------------------

    async def extreme_sampling(self, rng: random.Random) -> None:
        extra = rng.choice([
            {"temperature": 1e-39}, {"temperature": 1e-45, "seed": 2**64 - 1}, {"repetition_penalty": 1e-300},
            {"repetition_penalty": 1e300}, {"seed": 2**64}, {"seed": -(2**70)}, {"top_k": 10**9}, {"top_p": 1e-300},
            {"presence_penalty": 2, "frequency_penalty": -2}, {"max_tokens": 10**9}, {"max_tokens": -1},
            {"n": 10**6}, {"temperature": float("inf")}, {"stop": ["x"] * 100},
        ])
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **extra}
        content = json.dumps(body).replace("Infinity", "1e999").encode()  # JSON has no infinity; 1e999 parses to it
        await self.expect("extreme_sampling", self.http.post("/v1/chat/completions", content=content,
                                                             headers={"Content-Type": "application/json"}),
                          {"200", "400"})

    async def disconnect_plain(self, rng: random.Random) -> None:
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": f"Talk {rng.random()}"}],
                           "n": MAX_CHOICES, "max_tokens": LONG_TOKENS, "temperature": 0.7}).encode()
        reader, writer = await self.raw_request(body, len(body))
        await asyncio.sleep(rng.uniform(0.05, 1.0))
        try:  # 16 long replies cannot be ready yet: an answer now is a refusal, and the case tested nothing
            early = await asyncio.wait_for(reader.read(64), 0.01)
            answer = f"answered before the hang-up: {early[:12].decode(errors='replace')}"
        except asyncio.TimeoutError:
            answer = "closed by the client"
        writer.close()
        await writer.wait_closed()
        self.tally.hostile_answer("disconnect_plain", answer, {"closed by the client"})

    async def disconnect_stream(self, rng: random.Random) -> None:
        stream = await self.sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Talk {rng.random()}"}], max_tokens=LONG_TOKENS,
            stream=True, temperature=0.7)
        chunks = 0
        async for _ in stream:
            chunks += 1
            if chunks >= rng.randint(1, 5):
                break
        await stream.close()
        self.tally.hostile_answer("disconnect_stream", "closed by the client", {"closed by the client"})

    async def oversized_body(self, rng: random.Random) -> None:
        if rng.random() < 0.5:
            request = self.http.post("/v1/completions", content=self.oversized,
                                     headers={"Content-Type": "application/json"})
            await self.expect("oversized_body", request, {"413"})
        else:
            async def chunks():
                for start in range(0, len(self.oversized), 2**20):
                    yield self.oversized[start:start + 2**20]

            request = self.http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
            await self.expect("oversized_chunked", request, {"413"})

    async def large_prompt(self, rng: random.Random) -> None:
        request = self.http.post("/v1/completions", json={"model": MODEL, "prompt": self.large_text, "max_tokens": 1})
        await self.expect("large_prompt", request, {"400"})

    async def malformed_json(self, rng: random.Random) -> None:
        content = rng.choice([b"{not json", b'{"messages": "hi"}', b'{"messages": [{"role": 5}]}', b"[]",
                              bytes(rng.randrange(256) for _ in range(64)), b'{"prompt": ' * 1000])
        path = rng.choice(["/v1/chat/completions", "/v1/completions"])
        await self.expect("malformed_json", self.http.post(path, content=content,
                                                           headers={"Content-Type": "application/json"}), {"400"})

    async def huge_choices(self, rng: random.Random) -> None:
        request = self.http.post("/v1/completions", json={"model": MODEL, "prompt": ["Hi"] * 100, "n": 16,
                                                          "max_tokens": 4})
        await self.expect("huge_choices", request, {"400"})

    async def bad_auth(self, rng: random.Random) -> None:
        headers = rng.choice([{"Authorization": ""}, {"Authorization": "Bearer wrong"},
                              {"Authorization": "Basic !!!notbase64"}, {"Authorization": "Bearer " + "x" * 10_000}])
        request = self.http.post("/v1/chat/completions", headers=headers,
                                 json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        await self.expect("bad_auth", request, {"401"})

    async def slowloris(self, rng: random.Random) -> None:
        reader, writer = await self.raw_request(b'{"messages": [{"role": "user", "content": "', 10_000)
        try:
            answer = await asyncio.wait_for(reader.read(), BODY_TIMEOUT_S + 60)  # until the server closes
            status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/1.1 ") else "no answer"
        except (asyncio.TimeoutError, ConnectionError) as error:
            status = f"{type(error).__name__}"
        finally:
            writer.close()
        self.tally.hostile_answer("slowloris", status, {"408"})

    # Helpers ----------------------------------------------------------------------------------------------------------

    async def raw_request(self, body: bytes, content_length: int
                          ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {content_length}\r\n\r\n")
        writer.write(head.encode() + body)
        await writer.drain()
        return reader, writer

    async def expect(self, case: str, request: Awaitable[httpx.Response], expected: set[str]) -> None:
        try:
            response = await request
            answer = str(response.status_code)
            if response.status_code >= 400 and "error" not in response.json():
                answer += " without an OpenAI error body"
        except Exception as error:  # a dropped connection or a body that is not JSON: unexpected, reported
            answer = type(error).__name__
        self.tally.hostile_answer(case, answer, expected)

    async def poll_health(self, stop: asyncio.Event, pid: int) -> None:
        """/health's latency every half second, the server's RSS every ten."""
        began = last_sample = time.monotonic()
        async with httpx.AsyncClient(base_url=self.base, timeout=60) as client:
            while not stop.is_set():
                started = time.perf_counter()
                await client.get("/health")
                self.tally.health_latencies.append(time.perf_counter() - started)
                if time.monotonic() - last_sample >= 10:
                    last_sample = time.monotonic()
                    self.tally.rss_samples.append((round(last_sample - began, 1), memory_kib(pid)["VmRSS"]))
                await asyncio.sleep(0.5)


def check(condition: bool, detail: object) -> None:
    if not condition:
        raise AssertionError(f"malformed reply: {str(detail)[:300]}")


HOSTILE_CASES = ["extreme_sampling", "disconnect_plain", "disconnect_stream", "oversized_body", "large_prompt",
                 "malformed_json", "huge_choices", "bad_auth", "slowloris"]


async def worker(action: Callable[[random.Random], Awaitable[None]], rng: random.Random, until: float,
                 pause: float) -> None:
    while time.monotonic() < until:
        await action(rng)
        if pause:
            await asyncio.sleep(rng.uniform(0, 2 * pause))


async def soak(port: int, pid: int, minutes: float, benign_only_minutes: float, benign_clients: int,
               hostile_clients: int, seed: int) -> dict:
    rng = random.Random(seed)
    traffic = Traffic(port, Tally())
    # Warm-up: the KV cache and the allocator reach their working size before the first RSS reading.
    await asyncio.gather(*[traffic.benign(random.Random(seed + i)) for i in range(2 * benign_clients)])
    memory_start = memory_kib(pid)
    # The same benign clients alone first, for the latency they get without hostile neighbours.
    traffic.tally = Tally()
    until = time.monotonic() + benign_only_minutes * 60
    await asyncio.gather(*[worker(traffic.benign, random.Random(rng.random()), until, 0)
                           for _ in range(benign_clients)])
    alone = traffic.tally
    if alone.benign_failures:
        raise SystemExit(f"benign requests fail without any hostile traffic: {alone.benign_failures[:3]}")
    memory_mixed_start = memory_kib(pid)

    tally = traffic.tally = Tally()
    stop_polling = asyncio.Event()
    poller = asyncio.create_task(traffic.poll_health(stop_polling, pid))
    started = time.monotonic()
    until = started + minutes * 60

    async def hostile(case_rng: random.Random) -> None:
        case = case_rng.choice(HOSTILE_CASES)
        try:
            await getattr(traffic, case)(case_rng)
        except Exception as error:  # e.g. the server dropped a stream the client meant to close: unexpected
            tally.hostile_answer(case, f"{type(error).__name__}: {str(error)[:100]}", set())

    workers = [worker(traffic.benign, random.Random(rng.random()), until, 0) for _ in range(benign_clients)]
    workers += [worker(hostile, random.Random(rng.random()), until, 0.2) for _ in range(hostile_clients)]
    outcomes = await asyncio.gather(*workers, return_exceptions=True)
    traffic_seconds = time.monotonic() - started
    crashed_workers = [f"{type(o).__name__}: {o}" for o in outcomes if isinstance(o, BaseException)]
    # Once the traffic stops, every slot and queue place must come free: abandoned work was cancelled, not finished.
    stopped = time.monotonic()
    health = (await traffic.http.get("/health")).json()
    at_stop = {"running": health["running"], "waiting": health["waiting"]}
    while health["running"] + health["waiting"] and time.monotonic() - stopped < 30:
        await asyncio.sleep(0.1)
        health = (await traffic.http.get("/health")).json()
    drain_seconds = time.monotonic() - stopped
    stop_polling.set()
    await poller
    memory_end = memory_kib(pid)
    await traffic.close()
    latencies = tally.benign_latencies
    benign_total = sum(tally.benign_kinds.values())
    return {
        "traffic_seconds": traffic_seconds,
        "benign": {
            "requests": benign_total, "by_kind": dict(tally.benign_kinds), "failures": len(tally.benign_failures),
            "success_rate": (benign_total - len(tally.benign_failures)) / benign_total if benign_total else None,
            "first_failures": tally.benign_failures[:10],
            "latency_p50_s": statistics.median(latencies) if latencies else None,
            "latency_p95_s": _p95(latencies), "latency_max_s": max(latencies, default=None),
            "alone": {"requests": len(alone.benign_latencies),
                      "latency_p50_s": statistics.median(alone.benign_latencies) if alone.benign_latencies else None,
                      "latency_p95_s": _p95(alone.benign_latencies)},
        },
        "hostile": {case: dict(answers) for case, answers in sorted(tally.hostile.items())},
        "hostile_requests": sum(sum(answers.values()) for answers in tally.hostile.values()),
        "unexpected": {"count": len(tally.unexpected), "kinds": dict(Counter(tally.unexpected))},
        "crashed_workers": crashed_workers,
        "health_latency_p95_s": _p95(tally.health_latencies),
        "health_latency_max_s": max(tally.health_latencies, default=None),
        "rss_kib": {"after_warmup": memory_start["VmRSS"], "mixed_start": memory_mixed_start["VmRSS"],
                    "end": memory_end["VmRSS"], "peak": memory_end["VmHWM"], "every_10_s": tally.rss_samples},
        "busy_when_traffic_stopped": at_stop,
        "busy_at_end": {"running": health["running"], "waiting": health["waiting"]},
        "drain_seconds": drain_seconds,
    }


def stop_with_sigterm(process: subprocess.Popen) -> dict:
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        code = "killed after 60 s"
    return {"exit_status": code, "seconds": time.monotonic() - started}


def table(report: dict) -> str:
    benign, rss = report["benign"], report["rss_kib"]
    growth = (rss["end"] - rss["mixed_start"]) / 1024
    rows = [
        ("run", f"{report['traffic_seconds'] / 60:.1f} min, {report['config']['benign_clients']} benign + "
                f"{report['config']['hostile_clients']} hostile clients, {report['config']['size']} checkpoint, "
                f"{os.cpu_count()} CPUs"),
        ("benign requests", f"{benign['requests']} ({', '.join(f'{k} {v}' for k, v in benign['by_kind'].items())})"),
        ("benign success rate", f"{100 * benign['success_rate']:.2f} %" if benign["success_rate"] is not None else "-"),
        ("benign latency p50 / p95 / max", " / ".join(_seconds(benign[k]) for k in
                                                      ("latency_p50_s", "latency_p95_s", "latency_max_s"))),
        ("  the same clients alone: p50 / p95", f"{_seconds(benign['alone']['latency_p50_s'])} / "
                                                f"{_seconds(benign['alone']['latency_p95_s'])} "
                                                f"({benign['alone']['requests']} requests first)"),
        ("hostile requests", f"{report['hostile_requests']}, unexpected answers: {report['unexpected']['count']}"),
        *[(f"  {case}", ", ".join(f"{answer} x{count}" for answer, count in answers.items()))
          for case, answers in report["hostile"].items()],
        ("/health latency p95 / max", f"{_seconds(report['health_latency_p95_s'])} / "
                                      f"{_seconds(report['health_latency_max_s'])}"),
        ("server RSS: warm-up, mixed start, half-time, end", f"{rss['after_warmup'] / 1024:.0f}, "
                                                              f"{rss['mixed_start'] / 1024:.0f}, {_half_time(rss)}, "
                                                              f"{rss['end'] / 1024:.0f} MiB ({growth:+.0f} MiB while "
                                                              f"mixed; peak {rss['peak'] / 1024:.0f} MiB)"),
        ("busy when traffic stopped -> at end", f"{_busy(report['busy_when_traffic_stopped'])} -> "
                                                f"{_busy(report['busy_at_end'])} (drained in "
                                                f"{report['drain_seconds']:.1f} s)"),
        ("tracebacks in the server log", str(report["server_tracebacks"])),
        ("SIGTERM", f"exit status {report['sigterm']['exit_status']} after {report['sigterm']['seconds']:.1f} s"),
    ]
    lines = ["| measure | value |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def _p95(values: list[float]) -> float | None:
    return percentile(values, 0.95) if values else None


def _half_time(rss: dict) -> str:
    samples = rss["every_10_s"]
    return f"{samples[len(samples) // 2][1] / 1024:.0f}" if samples else "-"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _busy(counts: dict) -> str:
    return f"{counts['running']} running, {counts['waiting']} queued"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=2.0, help="how long the mixed traffic runs")
    parser.add_argument("--benign-only-minutes", type=float,
                        help="how long the benign clients run alone first (default: a quarter of --minutes)")
    parser.add_argument("--benign-clients", type=int, default=4,
                        help="benign clients, each sending one request after another")
    parser.add_argument("--hostile-clients", type=int, default=4, help="hostile clients, pausing 0-0.4 s between cases")
    parser.add_argument("--size", default="tiny", choices=["tiny", "mid"], help="the random checkpoint served")
    parser.add_argument("--max-batch-size", type=int, default=4, help="the server's --max-batch-size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="the JSON report (default: bench/results/soak_server-TIME.json)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "checkpoint"
        write_random_checkpoint(checkpoint, size=args.size)
        log = Path(folder) / "server.log"
        port = free_port()
        server = start_server(checkpoint, port, log, args.max_batch_size)
        try:
            benign_only = args.minutes / 4 if args.benign_only_minutes is None else args.benign_only_minutes
            report = asyncio.run(soak(port, server.pid, args.minutes, benign_only, args.benign_clients,
                                      args.hostile_clients, args.seed))
            alive = server.poll() is None
            report["sigterm"] = stop_with_sigterm(server) if alive else {"exit_status": server.returncode,
                                                                          "seconds": 0.0}
        finally:
            if server.poll() is None:
                server.kill()
        output = log.read_text()
        report["server_tracebacks"] = output.count("Traceback")
        report["server_log_tail"] = output[-3000:] if report["server_tracebacks"] else ""
    report["config"] = {"minutes": args.minutes, "benign_only_minutes": benign_only,
                        "benign_clients": args.benign_clients, "hostile_clients": args.hostile_clients,
                        "size": args.size, "max_batch_size": args.max_batch_size, "body_timeout_s": BODY_TIMEOUT_S,
                        "max_request_bytes": MAX_REQUEST_BYTES, "cpus": os.cpu_count(), "seed": args.seed}

    print(table(report))
    for failure in report["benign"]["first_failures"]:
        print("benign failure:", failure)
    for kind, count in report["unexpected"]["kinds"].items():
        print(f"unexpected: {kind} x{count}")
    destination = args.output or REPO / "bench" / "results" / f"soak_server-{time.strftime('%Y%m%d-%H%M%S')}.json"
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {destination}")
    healthy = (report["benign"]["success_rate"] == 1.0 and not report["unexpected"]["count"]
               and not report["crashed_workers"] and report["busy_at_end"] == {"running": 0, "waiting": 0}
               and report["sigterm"]["exit_status"] == 0 and not report["server_tracebacks"])
    raise SystemExit(0 if healthy else 1)


if __name__ == "__main__":
    main()
