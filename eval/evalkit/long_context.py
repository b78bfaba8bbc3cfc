"""Perplexity at long context lengths, with the context-extension options of the original README's long-context table.

The options are the model's own config switches, set on the loaded model one at a time:

- `plain`: none of them; rotary positions as trained, plain causal attention.
- `ntk`: `use_dynamic_ntk`, the rotary base raised for a sequence longer than `seq_length` (alpha chosen from the
  length of the whole window, as the released code chooses it from a prompt's length).
- `logn`: `use_logn_attn`, queries past `seq_length` scaled by log_{seq_length}(position).
- `window`: `use_window_attn`, each layer attending to its most recent `window_size` keys only (one size for all
  layers or one per layer; by default the checkpoint's `window_size`, else `seq_length`). The technical report's
  layer-wise windows are a per-layer list: `--window-size 1024,1024,...,8192`.

All three are exact no-ops up to `seq_length` tokens (alpha is 1, every logn factor is 1, every window covers the whole
sequence), so every option gives the same perplexity there; they differ only past it.

Method: the documents are tokenized as plain text, each followed by `<|endoftext|>` as pretraining data is packed, and
concatenated into one stream. The scored span is its first `--max-tokens` tokens (all of them by default), cut down to
a multiple of the longest length evaluated, so that every length scores the same tokens and only the context they see
changes. At length L the span is split into consecutive windows of L tokens; each window is one forward pass from an
empty context, and each of its tokens but the first is predicted from the tokens before it in its window. The
perplexity is exp(total negative log-likelihood / number of predicted tokens).

A window is one forward pass on purpose: the dynamic-NTK scaling is chosen from the length the model is given at
once, so feeding a window in pieces would score another model. What is split is the output layer: the logits
(L x 151,936 floats, 20 GB at 32K in fp32) are computed and scored a slice of positions at a time.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
from array import array
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qwen.loading import add_model_arguments

from .data import DataLayoutError, read_documents
from .results import ResultStore, write_json
from .tasks import _checkpoint_name, _encode, _load, _manifest, _positive_int, _progress, _user_errors

PUBLISHED_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
DEFAULT_OPTIONS = ("plain", "ntk", "ntk+logn", "ntk+logn+window")
PLOT_NAME = "ppl_vs_length.png"
# fp32 logits per slice of the output layer: about 1 GiB for the released vocabularies.
_LOGITS_BUDGET = 2**28


# --------------------------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContextOption:
    """Which of the three context-extension switches are on."""

    dynamic_ntk: bool = False
    logn: bool = False
    window: bool = False

    @property
    def name(self) -> str:
        parts = [part for part, on in (("ntk", self.dynamic_ntk), ("logn", self.logn), ("window", self.window)) if on]
        return "+".join(parts) or "plain"

    @property
    def label(self) -> str:
        """The row name of the published table."""
        parts = [part for part, on in (("dynamic_ntk", self.dynamic_ntk), ("logn", self.logn),
                                       ("window_attn", self.window)) if on]
        return "+ " + " + ".join(parts) if parts else "plain"


_OPTION_PARTS = {"ntk": "dynamic_ntk", "dynamic_ntk": "dynamic_ntk", "logn": "logn", "window": "window",
                 "window_attn": "window"}


def parse_option(text: str) -> ContextOption:
    """`plain`, or switches joined by `+`: `ntk` (or `dynamic_ntk`), `logn`, `window` (or `window_attn`)."""
    if text == "plain":
        return ContextOption()
    parts = text.split("+")
    unknown = [part for part in parts if part not in _OPTION_PARTS]
    if unknown or len(set(map(_OPTION_PARTS.get, parts))) != len(parts):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an option: use 'plain', or ntk, logn and window joined by '+' (e.g. ntk+logn), each once")
    return ContextOption(**{_OPTION_PARTS[part]: True for part in parts})


def parse_window_size(text: str) -> int | list[int]:
    """One window for every layer (`4096`), or one per layer separated by commas (`1024,1024,2048,...`)."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or one per layer separated by commas, got {text!r}"
                                         ) from None
    if any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"window sizes must be at least 1, got {text!r}")
    return sizes[0] if len(sizes) == 1 else sizes


_SWITCHES = ("use_dynamic_ntk", "use_logn_attn", "use_window_attn", "window_size")


@contextmanager
def context_option(model: Any, option: ContextOption, window_size: int | list[int] | None = None) -> Iterator[None]:
    """Run the model with `option`'s switches (and `window_size` when given), restoring its config afterwards.

    The model reads these config fields at every forward call, so no reload is needed between options.
    """
    config = model.config
    if isinstance(window_size, list) and len(window_size) != config.num_hidden_layers:
        raise ValueError(f"--window-size has {len(window_size)} sizes but the model has {config.num_hidden_layers} "
                         "layers; give one size for all layers or one per layer.")
    saved = {name: getattr(config, name) for name in _SWITCHES}
    config.use_dynamic_ntk = option.dynamic_ntk
    config.use_logn_attn = option.logn
    config.use_window_attn = option.window
    if window_size is not None:
        config.window_size = window_size
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(config, name, value)


# --------------------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------------------


def window_nll(model: Any, windows: torch.Tensor, max_logits_rows: int | None = None) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of every token of each window (B, L) but the first, given the tokens
    before it in its window, and how many tokens that is.

    The output layer runs `max_logits_rows` positions at a time (by default as many as fit about 1 GiB of fp32
    logits); the sum is kept in float64, so a million tokens add up without rounding away the differences between
    options.
    """
    embedding = model.get_input_embeddings().weight
    rows = max_logits_rows or max(1, _LOGITS_BUDGET // model.config.vocab_size)
    with torch.inference_mode():
        hidden = model.transformer(input_ids=windows.to(embedding.device), use_cache=False).last_hidden_state
        hidden = hidden[:, :-1].reshape(-1, hidden.size(-1))  # (B*(L-1), H): the positions that predict a token
        targets = windows[:, 1:].reshape(-1)  # (B*(L-1),)
        total = 0.0
        for start in range(0, hidden.size(0), rows):
            logits = model.lm_head(hidden[start:start + rows]).float()  # (rows, V)
            losses = F.cross_entropy(logits, targets[start:start + rows].to(logits.device), reduction="none")
            total += losses.double().sum().item()
    return total, int(targets.numel())


def span_windows(span: Sequence[int], length: int) -> torch.Tensor:
    """The span as consecutive windows of `length` tokens, (N, length); a tail shorter than `length` is dropped."""
    count = len(span) // length
    return torch.tensor(span[:count * length], dtype=torch.long).view(count, length)


def perplexity(nll: float, tokens: int) -> float | None:
    """exp(mean NLL), or None when the model produced no finite value (e.g. fp16 overflow)."""
    if tokens == 0 or not math.isfinite(nll):
        return None
    mean = nll / tokens
    return math.exp(mean) if mean < 700 else None


def token_stream(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Every text as plain text (special-token markup stays text), each followed by `<|endoftext|>`."""
    stream: list[int] = []
    for text in texts:
        stream.extend(_encode(tokenizer, text))
        stream.append(tokenizer.eod_id)
    return stream


def scored_span(stream: Sequence[int], lengths: Sequence[int], max_tokens: int | None
                ) -> tuple[list[int], list[int]]:
    """(the tokens every length scores, the lengths that fit in them); the span is a multiple of the longest."""
    available = min(len(stream), max_tokens) if max_tokens else len(stream)
    fitting = [length for length in lengths if length <= available]
    if not fitting:
        raise DataLayoutError(
            f"The documents hold {len(stream)} tokens{f' (--max-tokens {max_tokens})' if max_tokens else ''}; the "
            f"shortest length asked, {min(lengths)}, needs at least that many. Add text or ask for shorter lengths.")
    longest = max(fitting)
    return list(stream[:available // longest * longest]), fitting


# --------------------------------------------------------------------------------------------------------------------
# Table and plot
# --------------------------------------------------------------------------------------------------------------------


def markdown_table(lengths: Sequence[int], rows: Sequence[tuple[str, Sequence[float | None]]]) -> str:
    """Options as rows, lengths as columns, like the published table; `-` where a length was not evaluated."""
    lines = ["| option | " + " | ".join(map(str, lengths)) + " |", "|---|" + "---:|" * len(lengths)]
    for label, values in rows:
        cells = ["-" if value is None else f"{value:.2f}" for value in values]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


MATPLOTLIB_MISSING = ("the plot needs matplotlib, which is not installed: pip install -r requirements-eval.txt "
                      "(or pass --no-plot to write the table only)")


def require_matplotlib() -> None:
    """Fail before the model loads, not after an hour of scoring, when the plot cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(f"error: {MATPLOTLIB_MISSING}") from None


def plot_perplexity(lengths: Sequence[int], rows: Sequence[tuple[str, Sequence[float | None]]], seq_length: int,
                    path: str | Path, title: str) -> Any:
    """PPL against length, one line per option, log scales (the published values span 3 to 3000), a dashed line at
    the training length. Written to `path` (PNG); the matplotlib Figure is returned."""
    try:
        from matplotlib.figure import Figure  # a Figure without pyplot: no GUI backend, no global state
    except ImportError:
        raise RuntimeError(MATPLOTLIB_MISSING) from None
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    for label, values in rows:
        axes.plot(lengths, [math.nan if value is None else value for value in values], marker="o", label=label)
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xticks(list(lengths), [str(length) for length in lengths])
    axes.minorticks_off()
    if min(lengths) <= seq_length <= max(lengths):
        axes.axvline(seq_length, color="grey", linestyle="--", linewidth=1, label=f"seq_length {seq_length}")
    axes.set_xlabel("context length (tokens)")
    axes.set_ylabel("perplexity")
    axes.set_title(title)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=120)
    return figure


# --------------------------------------------------------------------------------------------------------------------
# The script
# --------------------------------------------------------------------------------------------------------------------


def _parser(description: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, default_checkpoint=None)  # the original had no such script, so no default to keep
    parser.add_argument("-d", "--data", nargs="+", required=True, metavar="PATH",
                        help="text files (one document each), .jsonl files (a \"text\" field per line), or folders "
                             "of them")
    parser.add_argument("--lengths", nargs="+", type=_positive_int, default=list(PUBLISHED_LENGTHS), metavar="L",
                        help="context lengths to score, in tokens (default: the published table's "
                             f"{' '.join(map(str, PUBLISHED_LENGTHS))})")
    parser.add_argument("--options", nargs="+", type=parse_option, default=[parse_option(o) for o in DEFAULT_OPTIONS],
                        metavar="OPTION",
                        help="'plain' or switches joined by '+' from ntk, logn, window (default: "
                             f"{' '.join(DEFAULT_OPTIONS)}, the published rows)")
    parser.add_argument("--window-size", type=parse_window_size,
                        help="keys each layer sees under the window option: one number, or one per layer separated "
                             "by commas (default: the checkpoint's window_size, else its seq_length)")
    parser.add_argument("--max-tokens", type=_positive_int,
                        help="score at most this many tokens of the documents (default: all of them)")
    parser.add_argument("--batch-tokens", type=_positive_int, default=32768,
                        help="tokens per forward pass: windows shorter than this run together (default 32768)")
    parser.add_argument("-o", "--output-dir", default=str(Path("eval_results") / "long_ppl"),
                        help="folder for results.json, results.md and the plot; a rerun reuses the lengths and "
                             "options already scored there on the same tokens (default eval_results/long_ppl)")
    parser.add_argument("--overwrite", action="store_true", help="discard the results already in the output folder")
    parser.add_argument("--no-plot", action="store_true", help=f"write no {PLOT_NAME} (matplotlib is not needed)")
    return parser


def run_long_ppl(argv: Sequence[str] | None = None, description: str | None = None) -> int:
    args = _parser(description).parse_args(argv)
    lengths = sorted(set(args.lengths))
    options = list(dict.fromkeys(args.options))  # a repeated option is scored once
    with _user_errors():
        if not args.no_plot:
            require_matplotlib()
        documents = read_documents(args.data)
        model, tokenizer = _load(args)
        config = model.config
        window_size = args.window_size if args.window_size is not None else config.window_size
        if isinstance(window_size, list) and len(window_size) != config.num_hidden_layers:
            raise SystemExit(f"error: --window-size has {len(window_size)} sizes but the model has "
                             f"{config.num_hidden_layers} layers; give one size for all layers or one per layer.")
        stream = token_stream(tokenizer, [document.text for document in documents])
        span, fitting = scored_span(stream, lengths, args.max_tokens)
        for length in lengths:
            if length not in fitting:
                print(f"length {length}: skipped, the scored text holds {len(span)} tokens", file=sys.stderr)
        span_sha256 = hashlib.sha256(array("q", span).tobytes()).hexdigest()
        output_dir = Path(args.output_dir)
        # What changes the numbers besides the tokens (recorded with each result): the checkpoint, its precision
        # and the window setting.
        store = ResultStore(output_dir, _manifest("long_ppl", "base", args, model, window_size=window_size),
                            args.overwrite)
        saved = {option: {key: record for key, record in store.load(option.name).items()
                          if record.get("span_sha256") == span_sha256} for option in options}
        # Longest first: a length that does not fit in memory fails at once, not at the end of the run.
        pending = [(length, option) for length in reversed(fitting) for option in options
                   if str(length) not in saved[option]]
        total_windows = sum(len(span) // length for length, _ in pending)
        with _progress(total_windows, "long-context perplexity", "window") as bar:
            for length, option in pending:
                windows = span_windows(span, length)
                per_batch = max(1, args.batch_tokens // length)
                nll, count = 0.0, 0
                bar.set_postfix_str(f"{option.name} @ {length}")
                with context_option(model, option, window_size):
                    for start in range(0, windows.size(0), per_batch):
                        batch_nll, batch_count = window_nll(model, windows[start:start + per_batch])
                        nll, count = nll + batch_nll, count + batch_count
                        bar.update(min(per_batch, windows.size(0) - start))
                record = {"id": length, "span_sha256": span_sha256, "nll": nll, "tokens": count,
                          "windows": int(windows.size(0))}
                store.append(option.name, record)
                saved[option][str(length)] = record

        rows = [(option.label, [perplexity(saved[option][str(length)]["nll"], saved[option][str(length)]["tokens"])
                                if str(length) in saved[option] else None for length in lengths])
                for option in options]
        for label, values in rows:
            for length, value in zip(lengths, values, strict=True):
                if value is None and length in fitting:
                    print(f"warning: {label} at {length}: the loss was not finite (overflow?); shown as '-'",
                          file=sys.stderr)
        checkpoint = _checkpoint_name(args.checkpoint_path)
        results = {
            "benchmark": "long-context perplexity",
            "checkpoint": checkpoint,
            "dtype": str(model.dtype).removeprefix("torch."),
            "seq_length": config.seq_length,
            "method": "documents tokenized and concatenated with <|endoftext|>; at each length the same span is cut "
                      "into consecutive windows, each one forward pass; PPL = exp(mean NLL of every token but each "
                      "window's first)",
            "data": {"documents": len(documents), "stream_tokens": len(stream), "span_tokens": len(span),
                     "span_sha256": span_sha256},
            "lengths": lengths,
            "options": [
                {"name": option.name, "label": option.label, "use_dynamic_ntk": option.dynamic_ntk,
                 "use_logn_attn": option.logn, "use_window_attn": option.window,
                 "window_size": (window_size if window_size is not None else config.seq_length) if option.window
                 else None,
                 "perplexity": {str(length): value for length, value in zip(lengths, values, strict=True)},
                 "scored_tokens": {str(length): saved[option][str(length)]["tokens"]
                                   for length in lengths if str(length) in saved[option]}}
                for option, (_, values) in zip(options, rows, strict=True)
            ],
        }
        write_json(output_dir / "results.json", results)
        heading = (f"Perplexity by context length: {checkpoint} ({results['dtype']}, seq_length {config.seq_length}), "
                   f"{len(span)} tokens of {len(documents)} document(s), the same tokens at every length")
        table = markdown_table(lengths, rows)
        (output_dir / "results.md").write_text(f"{heading}\n\n{table}\n", encoding="utf-8")
        print(f"{heading}\n\n{table}\n")
        print(f"results: {output_dir / 'results.json'}, {output_dir / 'results.md'}")
        if not args.no_plot:
            plot_perplexity(lengths, rows, config.seq_length, output_dir / PLOT_NAME,
                            f"{Path(checkpoint).name}: perplexity by context length")
            print(f"plot: {output_dir / PLOT_NAME}")
    return 0


__all__ = [
    "DEFAULT_OPTIONS", "PUBLISHED_LENGTHS", "ContextOption", "context_option", "markdown_table", "parse_option",
    "parse_window_size", "perplexity", "plot_perplexity", "require_matplotlib", "run_long_ppl", "scored_span",
    "span_windows", "token_stream", "window_nll",
]
