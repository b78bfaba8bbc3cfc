"""Long-context perplexity (eval/evaluate_long_ppl.py): the context-extension switches on a loaded model, the scoring,
and the script end to end on a tiny checkpoint whose `seq_length` is 32, so that lengths past it cost little.

The checkpoint's weights are drawn with a wider init than usual (0.3 instead of 0.02): with the usual init attention is
nearly uniform and what the switches change sits below fp32 resolution of the loss, so a test could not tell them
apart; with sharper attention each switch moves the perplexity visibly.
"""

from __future__ import annotations

import itertools
import json
import random
import runpy
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT / "eval"
sys.path.insert(0, str(EVAL))

from evalkit.data import DataLayoutError, read_documents  # noqa: E402
from evalkit.long_context import (  # noqa: E402
    DEFAULT_OPTIONS,
    ContextOption,
    context_option,
    markdown_table,
    parse_option,
    scored_span,
    window_nll,
)

SEQ_LENGTH = 32
WORDS = ("the of and to in is that for we this with as on by are be an proof theorem lemma let then model context "
         "attention rotary window length position token layer scale paper result show holds every case").split()


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory, vocab_file) -> Path:
    from qwen.checkpoint import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("long-ctx"), size="tiny", chat=False, seed=3,
                                   seq_length=SEQ_LENGTH, initializer_range=0.3, vocab_file=vocab_file)


@pytest.fixture(scope="module")
def long_model(long_dir):
    from qwen import QWenLMHeadModel

    return QWenLMHeadModel.from_pretrained(long_dir).eval()


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> Path:
    """Two text files of seeded word salad, about 300 tokens together (arXiv papers in a real run)."""
    folder = tmp_path_factory.mktemp("docs")
    rng = random.Random(0)
    for name in ("a.txt", "b.txt"):
        (folder / name).write_text(" ".join(rng.choice(WORDS) for _ in range(140)) + ".\n", encoding="utf-8")
    return folder


def logits(model, ids: torch.Tensor, option: ContextOption) -> torch.Tensor:
    with context_option(model, option), torch.inference_mode():
        return model(ids, use_cache=False).logits


# --------------------------------------------------------------------------------------------------------------------
# The switches, on the model
# --------------------------------------------------------------------------------------------------------------------


def test_each_switch_is_a_no_op_up_to_seq_length_and_changes_the_logits_past_it(long_model):
    # Read from modeling_qwen: the NTK alpha for L <= seq_length is 2^1 - 1 = 1, the logn factor is 1 for positions
    # below seq_length (and not even computed), and a window of seq_length keys covers a sequence that short.
    ids = torch.randint(0, 150000, (1, SEQ_LENGTH + 1), generator=torch.Generator().manual_seed(0))
    switches = [ContextOption(dynamic_ntk=True), ContextOption(logn=True), ContextOption(window=True)]
    plain_within = logits(long_model, ids[:, :SEQ_LENGTH], ContextOption())
    plain_past = logits(long_model, ids, ContextOption())
    for option in switches:
        torch.testing.assert_close(logits(long_model, ids[:, :SEQ_LENGTH], option), plain_within, atol=0, rtol=0)
        past = logits(long_model, ids, option)
        assert (past - plain_past).abs().max() > 1e-3, option.name
    # One token past seq_length, only the last position sees the difference, except under NTK, whose alpha (3 for
    # any length up to 2 x seq_length) rotates every position differently.
    torch.testing.assert_close(logits(long_model, ids, switches[1])[:, :SEQ_LENGTH], plain_past[:, :SEQ_LENGTH])
    torch.testing.assert_close(logits(long_model, ids, switches[2])[:, :SEQ_LENGTH], plain_past[:, :SEQ_LENGTH])
    assert (logits(long_model, ids, switches[0])[:, :SEQ_LENGTH] - plain_past[:, :SEQ_LENGTH]).abs().max() > 1e-3


def test_switching_on_a_loaded_model_equals_loading_with_the_switch(long_dir, long_model):
    from qwen import QWenLMHeadModel

    ids = torch.randint(0, 150000, (1, 3 * SEQ_LENGTH), generator=torch.Generator().manual_seed(1))
    built = QWenLMHeadModel.from_pretrained(long_dir, use_dynamic_ntk=True, use_logn_attn=True, use_window_attn=True,
                                            window_size=[8, 40]).eval()
    with torch.inference_mode():
        expected = built(ids, use_cache=False).logits
    with context_option(long_model, parse_option("ntk+logn+window"), window_size=[8, 40]), torch.inference_mode():
        switched = long_model(ids, use_cache=False).logits
    torch.testing.assert_close(switched, expected, atol=0, rtol=0)
    # ... and the config is as it was afterwards.
    assert long_model.config.use_window_attn is False and long_model.config.window_size is None
    assert long_model.transformer.h[0].attn.window is None


def test_window_nll_is_the_models_own_loss(long_model):
    windows = torch.randint(0, 150000, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        losses = [long_model(row[None], labels=row[None], use_cache=False).loss.item() for row in windows]
    # 7 rows per slice: the output layer runs in 14 slices, one of them short.
    nll, count = window_nll(long_model, windows, max_logits_rows=7)
    assert count == 2 * 47
    assert nll == pytest.approx(sum(loss * 47 for loss in losses), rel=1e-5)
    assert window_nll(long_model, windows)[0] == pytest.approx(nll, rel=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Options, data, span
# --------------------------------------------------------------------------------------------------------------------


def test_options_parse_to_the_published_rows():
    options = [parse_option(text) for text in DEFAULT_OPTIONS]
    assert [o.label for o in options] == ["plain", "+ dynamic_ntk", "+ dynamic_ntk + logn",
                                         "+ dynamic_ntk + logn + window_attn"]
    assert [o.name for o in options] == list(DEFAULT_OPTIONS)
    assert parse_option("window_attn+dynamic_ntk") == ContextOption(dynamic_ntk=True, window=True)
    for wrong in ("ntk+ntk", "ntk+dynamic_ntk", "yarn", "plain+logn", ""):
        with pytest.raises(Exception, match="is not an option"):
            parse_option(wrong)


def test_documents_from_files_folders_and_json_lines(tmp_path):
    (tmp_path / "papers").mkdir()
    (tmp_path / "papers" / "b.tex").write_text("\\section{B}", encoding="utf-8")
    (tmp_path / "papers" / "a.txt").write_text("A paper.", encoding="utf-8")
    (tmp_path / "papers" / "notes.pdf").write_bytes(b"%PDF")  # not text: left alone
    (tmp_path / "more.jsonl").write_text('{"text": "first"}\n{"text": ""}\n{"text": "second"}\n', encoding="utf-8")
    documents = read_documents([tmp_path / "papers", tmp_path / "more.jsonl"])
    assert [d.text for d in documents] == ["A paper.", "\\section{B}", "first", "second"]
    assert documents[3].where.endswith("more.jsonl:3")
    with pytest.raises(DataLayoutError, match="does not exist"):
        read_documents([tmp_path / "nowhere.txt"])
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(DataLayoutError, match="not UTF-8"):
        read_documents([tmp_path / "latin1.txt"])


def test_every_length_scores_the_same_span():
    stream = list(range(1000))
    span, fitting = scored_span(stream, [64, 256, 512, 2048], max_tokens=None)
    assert fitting == [64, 256, 512] and span == stream[:512]  # 2048 does not fit; 512 divides the span
    span, fitting = scored_span(stream, [100, 300], max_tokens=700)
    assert fitting == [100, 300] and len(span) == 600
    with pytest.raises(DataLayoutError, match="hold 1000 tokens.*shortest length asked, 2048"):
        scored_span(stream, [2048, 4096], max_tokens=None)


def test_markdown_table_marks_lengths_not_evaluated():
    table = markdown_table([1024, 2048], [("plain", [4.234, None])])
    assert table.splitlines() == ["| option | 1024 | 2048 |", "|---|---:|---:|", "| plain | 4.23 | - |"]


# --------------------------------------------------------------------------------------------------------------------
# The script
# --------------------------------------------------------------------------------------------------------------------


def run_script(arguments: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`python eval/evaluate_long_ppl.py <arguments>`, in this process."""
    monkeypatch.setattr(sys, "argv", [str(EVAL / "evaluate_long_ppl.py"), *arguments])
    try:
        runpy.run_path(str(EVAL / "evaluate_long_ppl.py"), run_name="__main__")
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise


def test_script_writes_the_table_and_the_plot_and_the_options_differ_only_past_seq_length(
        long_dir, documents, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib", reason="requirements-eval.txt installs matplotlib for the plot")
    output = tmp_path / "out"
    arguments = ["-c", str(long_dir), "-d", str(documents), "--lengths", "16", "32", "64", "128", "4096",
                 "-o", str(output), "--batch-tokens", "256"]
    run_script(arguments, monkeypatch)
    results = json.loads((output / "results.json").read_text())
    assert results["seq_length"] == SEQ_LENGTH and results["lengths"] == [16, 32, 64, 128, 4096]
    assert results["data"]["span_tokens"] == 256  # the ~300 tokens, cut to a multiple of 128
    ppl = {option["name"]: option["perplexity"] for option in results["options"]}
    assert list(ppl) == list(DEFAULT_OPTIONS)
    for name in DEFAULT_OPTIONS:
        assert ppl[name]["4096"] is None  # longer than the text: skipped, shown as '-'
        assert all(isinstance(ppl[name][n], float) and 1 < ppl[name][n] < 1e9 for n in ("16", "32", "64", "128"))
    for length in ("16", "32"):  # up to seq_length: exactly the same numbers
        assert len({ppl[name][length] for name in DEFAULT_OPTIONS}) == 1
    for length in ("64", "128"):  # past it: each switch added moves the perplexity (float noise is ~1e-9 here)
        values = [ppl[name][length] for name in DEFAULT_OPTIONS]
        assert all(abs(after - before) / before > 1e-3 for before, after in itertools.pairwise(values)), values
    window = next(option for option in results["options"] if option["name"] == "ntk+logn+window")
    assert window["window_size"] == SEQ_LENGTH and window["scored_tokens"] == {"16": 240, "32": 248, "64": 252,
                                                                                "128": 254}
    table = (output / "results.md").read_text()
    assert "| option | 16 | 32 | 64 | 128 | 4096 |" in table and "| + dynamic_ntk + logn | " in table
    assert table.splitlines()[-1].endswith(" | - |")
    assert table.split("\n\n")[1] in capsys.readouterr().out

    png = (output / "ppl_vs_length.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    from matplotlib.image import imread

    height, width = imread(output / "ppl_vs_length.png").shape[:2]
    assert (width, height) == (840, 540)  # 7 x 4.5 inches at 120 dpi

    # A rerun scores nothing again: every (option, length) of these tokens is in the output folder.
    items = sorted((output / "items").glob("*.jsonl"))
    sizes = [path.stat().st_size for path in items]
    run_script([*arguments, "--no-plot", "--options", "ntk", "plain"], monkeypatch)
    assert [path.stat().st_size for path in items] == sizes
    rerun = json.loads((output / "results.json").read_text())
    assert [option["perplexity"] for option in rerun["options"]] == [ppl["ntk"], ppl["plain"]]


def test_plot_has_one_line_per_option(tmp_path):
    pytest.importorskip("matplotlib", reason="requirements-eval.txt installs matplotlib for the plot")
    from evalkit.long_context import plot_perplexity

    rows = [("plain", [4.2, 3.8, 39.4]), ("+ dynamic_ntk", [4.2, 3.8, None])]
    figure = plot_perplexity([1024, 2048, 4096], rows, 2048, tmp_path / "p.png", "test")
    lines = [line for line in figure.axes[0].get_lines() if not line.get_label().startswith("seq_length")]
    assert [line.get_label() for line in lines] == ["plain", "+ dynamic_ntk"]
    assert list(lines[0].get_ydata()) == [4.2, 3.8, 39.4]
    assert list(lines[1].get_ydata())[:2] == [4.2, 3.8] and str(lines[1].get_ydata()[2]) == "nan"
    assert (tmp_path / "p.png").stat().st_size > 0


def test_missing_matplotlib_stops_the_script_before_the_model_loads(documents, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` meets where it is not installed
    with pytest.raises(SystemExit, match=r"^error: the plot needs matplotlib.*pip install -r requirements-eval.txt"):
        run_script(["-c", "/nowhere/checkpoint", "-d", str(documents)], monkeypatch)


def test_user_errors_are_one_line(long_dir, documents, tmp_path, monkeypatch):
    common = ["-c", str(long_dir), "-o", str(tmp_path / "out"), "--no-plot"]
    with pytest.raises(SystemExit, match=r"^error: .*nowhere.* does not exist"):
        run_script([*common, "-d", str(tmp_path / "nowhere")], monkeypatch)
    with pytest.raises(SystemExit, match=r"^error: --window-size has 3 sizes but the model has 2 layers"):
        run_script([*common, "-d", str(documents), "--window-size", "8,8,8"], monkeypatch)
    with pytest.raises(SystemExit, match=r"^error: The documents hold \d+ tokens; the shortest length asked, 100000"):
        run_script([*common, "-d", str(documents), "--lengths", "100000"], monkeypatch)
