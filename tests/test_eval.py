"""eval/: dataset layouts, batched letter scoring, resumable results, and every script end to end on tiny checkpoints.

The fixture datasets in tests/fixtures/eval/ are a few questions per subject, written for these tests, in the layouts
the publishers distribute. The scripts run the way a user runs them: as files, with their command-line arguments
(in this process through runpy for speed, and as real subprocesses for a few of them; all of them with -m slow).
"""

from __future__ import annotations

import hashlib
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT / "eval"
DATA = Path(__file__).parent / "fixtures" / "eval"
sys.path.insert(0, str(EVAL))

from evalkit.data import (  # noqa: E402
    CEVAL_LAYOUT,
    CMMLU_LAYOUT,
    MMLU_LAYOUT,
    DataLayoutError,
    read_choice_subjects,
    read_gsm8k,
    read_humaneval,
    read_tool_use,
)
from evalkit.inference import next_token_logprobs  # noqa: E402
from evalkit.prompts import mmlu_base_prompt  # noqa: E402
from evalkit.results import ResultsMismatchError, ResultStore, accuracy_summary  # noqa: E402

import evalkit.tasks as tasks  # noqa: E402

LETTERS = {"A", "B", "C", "D"}
# Few-shot GSM8K exemplars written for these tests (the original's are GSM8K train problems, not shipped here).
EXEMPLARS = DATA / "gsm8k" / "exemplars.txt"


# --------------------------------------------------------------------------------------------------------------------
# Data layouts
# --------------------------------------------------------------------------------------------------------------------


def test_multiple_choice_layouts_read_as_published():
    mmlu = read_choice_subjects(DATA / "mmlu", MMLU_LAYOUT)  # the folder above data/, as data.tar extracts
    assert [(s.name, len(s.dev), len(s.questions)) for s in mmlu] == [("abstract_algebra", 5, 3),
                                                                      ("world_religions", 5, 2)]
    multiline = mmlu[0].questions[2]  # a quoted CSV field spanning two lines
    assert multiline.text.startswith("Let H be a subgroup") and "\nIf |G| = 12" in multiline.text
    assert multiline.options == ("1", "5", "6", "12") and multiline.answer == "B"
    assert read_choice_subjects(DATA / "mmlu" / "data", MMLU_LAYOUT)[1].questions[0].answer == "B"

    ceval = read_choice_subjects(DATA / "ceval", CEVAL_LAYOUT)  # val is evaluated: test has no answers
    assert [(s.name, len(s.questions)) for s in ceval] == [("computer_network", 3), ("logic", 2)]
    assert ceval[0].questions[0].text == "DNS的主要作用是____。" and ceval[0].questions[0].answer == "B"

    cmmlu = read_choice_subjects(DATA / "cmmlu", CMMLU_LAYOUT, subjects=["chinese_history"], limit=1)
    assert [(s.name, len(s.dev), len(s.questions)) for s in cmmlu] == [("chinese_history", 5, 1)]
    assert cmmlu[0].questions[0].options[1] == "唐太宗"


def test_json_lines_datasets():
    problems = read_gsm8k(DATA / "gsm8k")
    assert [int(p.answer) for p in problems] == [10, 8, 900, 210]
    assert read_gsm8k(DATA / "gsm8k" / "test.jsonl", limit=2)[1].answer == 8
    tasks = read_humaneval(DATA / "humaneval")
    assert [t.entry_point for t in tasks] == ["running_max", "is_palindrome", "digit_sum"]
    positive = read_tool_use(DATA / "plugin", "exam_plugin_v20231206_react_positive.jsonl")
    assert len(positive) == 2 and "Action: get_weather" in positive[0].reference


def test_fixture_tool_prompt_is_the_prompt_the_server_builds():
    # The plugin fixture holds prompts in the published form (instruction, tools, question in one user turn); they
    # must be what qwen.react writes, or the trained tool model of the end-to-end test would not recognise them.
    from conftest import WEATHER_QUESTION, WEATHER_TOOLS

    from qwen.react import normalize_tools, react_instruction

    expected = f"{react_instruction(normalize_tools(tools=WEATHER_TOOLS))}\n\nQuestion: {WEATHER_QUESTION}"
    samples = read_tool_use(DATA / "plugin", "exam_plugin_v20231206_react_positive.jsonl")
    assert {s.prompt for s in samples} == {expected}


def test_layout_errors_name_the_expected_layout(tmp_path):
    with pytest.raises(DataLayoutError, match=r"does not exist.*dev/<subject>_dev.csv.*data.tar"):
        read_choice_subjects(tmp_path / "nowhere", MMLU_LAYOUT)
    with pytest.raises(DataLayoutError, match=r"no dev and no val folder.*ceval-exam.zip"):
        read_choice_subjects(tmp_path, CEVAL_LAYOUT)
    (tmp_path / "dev").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(DataLayoutError, match=r"no \*\.csv files.*header row with columns Question,A,B,C,D,Answer"):
        read_choice_subjects(tmp_path, CMMLU_LAYOUT)
    (tmp_path / "test" / "law.csv").write_text(",Question,A,B,C,D,Answer\n0,q,a,b,c,d,A\n", encoding="utf-8")
    with pytest.raises(DataLayoutError, match=r"dev/law.csv is missing"):
        read_choice_subjects(tmp_path, CMMLU_LAYOUT)
    (tmp_path / "dev" / "law.csv").write_text("Question,A,B,C,D\nq,a,b,c,d\n", encoding="utf-8")
    with pytest.raises(DataLayoutError, match=r"law.csv has no 'Answer' column"):
        read_choice_subjects(tmp_path, CMMLU_LAYOUT)
    with pytest.raises(DataLayoutError, match=r"No CMMLU subject 'physics'.*the subjects there are: law"):
        read_choice_subjects(tmp_path, CMMLU_LAYOUT, subjects=["physics"])
    # C-Eval's test split has empty answers: pointing the reader at it says so.
    val = tmp_path / "ceval" / "val"
    val.mkdir(parents=True)
    (tmp_path / "ceval" / "dev").mkdir()
    (val / "law_val.csv").write_text("id,question,A,B,C,D,answer\n0,q,a,b,c,d,\n", encoding="utf-8")
    (tmp_path / "ceval" / "dev" / "law_dev.csv").write_text("id,question,A,B,C,D,answer\n", encoding="utf-8")
    with pytest.raises(DataLayoutError, match=r"law_val.csv:2: .*test split has no public answers"):
        read_choice_subjects(tmp_path / "ceval", CEVAL_LAYOUT)
    with pytest.raises(DataLayoutError, match=r"GSM8K test set not found: .* has no test.jsonl.*grade-school-math"):
        read_gsm8k(tmp_path)
    (tmp_path / "test.jsonl").write_text('{"question": "q", "answer": "no marker"}\n', encoding="utf-8")
    with pytest.raises(DataLayoutError, match=r"problem 1 has no '#### <number>' line"):
        read_gsm8k(tmp_path)
    (tmp_path / "HumanEval.jsonl").write_text('{"task_id": "x", "prompt": "p"}\n', encoding="utf-8")
    with pytest.raises(DataLayoutError, match=r"HumanEval.jsonl:1 has no text field 'canonical_solution'"):
        read_humaneval(tmp_path)


# --------------------------------------------------------------------------------------------------------------------
# GSM8K's few-shot exemplars, rebuilt from the train split
# --------------------------------------------------------------------------------------------------------------------

TRAIN_RECORDS = [  # GSM8K-style training problems written for these tests, with calculator annotations
    {"question": "Ava has 3 bags of 5 marbles. How many marbles does she have?",
     "answer": "She has 3 * 5 = <<3*5=15>>15 marbles.\n#### 15"},
    {"question": "A bus seats 40. 12 seats are empty. How many people ride?",
     "answer": "40 - 12 = <<40-12=28>>28 people ride.\nSo the bus carries 28.\n#### 28"},
    {"question": "Leo reads 9 pages a day. How many pages does he read in 4 days?",
     "answer": "9 * 4 = <<9*4=36>>36\n#### 36"},
]
# What the original scripts' exemplar layout makes of the first two, written out by hand.
EXPECTED_EXEMPLARS = (
    "Question: Ava has 3 bags of 5 marbles. How many marbles does she have?\nLet's think step by step\n"
    "She has 3 * 5 = 15 marbles.\nThe answer is 15\n\n"
    "Question: A bus seats 40. 12 seats are empty. How many people ride?\nLet's think step by step\n"
    "40 - 12 = 28 people ride.\nSo the bus carries 28.\nThe answer is 28\n")


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def test_gsm8k_exemplars_are_rebuilt_from_train_problems_named_by_line_and_digest(tmp_path):
    from evalkit.prompts import GSM8K_BASE_EXEMPLARS, GSM8K_CHAT_EXEMPLARS, gsm8k_exemplar, gsm8k_exemplars

    # The original's eight (base) and four (chat --use-fewshot): distinct lines of the official train.jsonl (7,473
    # problems) and a SHA-256 each.
    for picks, count in ((GSM8K_BASE_EXEMPLARS, 8), (GSM8K_CHAT_EXEMPLARS, 4)):
        assert len(picks) == count and len({line for line, _ in picks}) == count
        assert all(0 <= line < 7473 and len(digest) == 64 and int(digest, 16) >= 0 for line, digest in picks)
    digests = [hashlib.sha256(gsm8k_exemplar(r["question"], r["answer"]).encode()).hexdigest() for r in TRAIN_RECORDS]
    picks = [(1, digests[1]), (0, digests[0])]
    assert gsm8k_exemplars(TRAIN_RECORDS, [(0, digests[0]), (1, digests[1])], "train.jsonl") == EXPECTED_EXEMPLARS
    # A copy in another order: each problem is found by its digest; the order of the picks is kept.
    shuffled = [TRAIN_RECORDS[2], TRAIN_RECORDS[1], TRAIN_RECORDS[0]]
    parts = EXPECTED_EXEMPLARS.rstrip("\n").split("\n\n")
    assert gsm8k_exemplars(shuffled, picks, "train.jsonl") == f"{parts[1]}\n\n{parts[0]}\n"
    edited = [TRAIN_RECORDS[0], {**TRAIN_RECORDS[1], "answer": TRAIN_RECORDS[1]["answer"].replace("28", "29")}]
    with pytest.raises(DataLayoutError, match=r"^my/train.jsonl is not GSM8K's train split as published: it lacks "
                                              r"the problem on line 2 of the official file, exemplar 1 of the 2 .*"
                                              r"grade_school_math/data/train.jsonl, or pass --prompt-file"):
        gsm8k_exemplars(edited, picks, "my/train.jsonl")


def test_gsm8k_few_shot_scripts_read_the_original_exemplars_from_the_train_split(checkpoints, tmp_path, monkeypatch):
    # Without train.jsonl, or with one that lacks the original's problems, the scripts stop before loading the
    # model, with one line naming the fix.
    test_only = ["-d", str(DATA / "gsm8k"), "-o", str(tmp_path / "out"), "-c", str(tmp_path / "no-model")]
    for script, extra in (("evaluate_gsm8k.py", []), ("evaluate_chat_gsm8k.py", ["--use-fewshot"])):
        monkeypatch.setattr(sys, "argv", [script, *test_only, *extra])
        with pytest.raises(SystemExit, match=r"^error: GSM8K train set not found: .*gsm8k has no train.jsonl\. The "
                                             r"few-shot exemplars are problems of it, .* pass --train-file, or pass "
                                             r"--prompt-file with exemplars of your own\.$"):
            runpy.run_path(str(EVAL / script), run_name="__main__")
    data = tmp_path / "gsm8k"
    data.mkdir()
    (data / "test.jsonl").write_bytes((DATA / "gsm8k" / "test.jsonl").read_bytes())
    _write_jsonl(data / "train.jsonl", TRAIN_RECORDS)
    arguments = ["-d", str(data), "-o", str(tmp_path / "out"), "-c", str(tmp_path / "no-model")]
    for script, extra, line in (("evaluate_gsm8k.py", [], 4998), ("evaluate_chat_gsm8k.py", ["--use-fewshot"], 7365)):
        monkeypatch.setattr(sys, "argv", [script, *arguments, *extra])
        with pytest.raises(SystemExit, match=rf"^error: .*train.jsonl is not GSM8K's train split as published: it "
                                             rf"lacks the problem on line {line} of the official file, exemplar 1 "):
            runpy.run_path(str(EVAL / script), run_name="__main__")
    # --train-file names it anywhere; a missing one is named.
    monkeypatch.setattr(sys, "argv", ["evaluate_gsm8k.py", *test_only, "--train-file", str(tmp_path / "nope.jsonl")])
    with pytest.raises(SystemExit, match=r"^error: GSM8K train set '.*nope.jsonl' \(--train-file\) does not exist"):
        runpy.run_path(str(EVAL / "evaluate_gsm8k.py"), run_name="__main__")


# The SHA-256 of the original release's eval/gsm8k_prompt.txt, and of the user turn its chat script's --use-fewshot
# built for the first question of tests/fixtures/eval/gsm8k/test.jsonl (both computed from the original's files).
ORIGINAL_GSM8K_PROMPT_SHA256 = "b067972c3ba476496af49bacfc2ade83e4bc72c47a52f7f0e70d7d9e8f573e0d"
ORIGINAL_CHAT_FEWSHOT_TURN_SHA256 = "20b8f83d2a00201796b5701fc779c891e458e5005ed0cb6b3cbf730ce0457769"


@pytest.mark.skipif(not os.environ.get("QWEN_TEST_GSM8K_TRAIN"),
                    reason="needs GSM8K's official train.jsonl: set QWEN_TEST_GSM8K_TRAIN to its path")
def test_gsm8k_prompts_equal_the_originals_byte_for_byte(vocab_file, tmp_path, monkeypatch, capsys):
    from qwen.checkpoint import write_random_checkpoint

    # Tiny models whose context holds the whole 8-shot prompt (about 900 tokens).
    checkpoints = {kind: write_random_checkpoint(tmp_path / kind, size="tiny", chat=kind == "chat", seq_length=2048)
                   for kind in ("base", "chat")}
    train = os.environ["QWEN_TEST_GSM8K_TRAIN"]
    question = read_gsm8k(DATA / "gsm8k")[0].question
    common = ["-d", str(DATA / "gsm8k"), "--train-file", train, "--limit", "1", "--max-new-tokens", "1", "--debug"]
    assert run_script("evaluate_gsm8k.py", ["-c", str(checkpoints["base"]), "-o", str(tmp_path / "base"), *common],
                      monkeypatch) == 0
    prompt = capsys.readouterr().err.split("--- prompt ---\n")[1].split("\n--- answer ---")[0]
    exemplars = prompt.removesuffix(f"\nQuestion: {question}\nLet's think step by step\n")
    assert hashlib.sha256(exemplars.encode()).hexdigest() == ORIGINAL_GSM8K_PROMPT_SHA256
    assert run_script("evaluate_chat_gsm8k.py", ["-c", str(checkpoints["chat"]), "-o", str(tmp_path / "chat"),
                                                 "--use-fewshot", *common], monkeypatch) == 0
    prompt = capsys.readouterr().err.split("--- prompt ---\n")[1].split("\n--- answer ---")[0]
    turn = prompt.split("<|im_start|>user\n")[1].split("<|im_end|>\n<|im_start|>assistant\n")[0]
    assert hashlib.sha256(turn.encode()).hexdigest() == ORIGINAL_CHAT_FEWSHOT_TURN_SHA256


# --------------------------------------------------------------------------------------------------------------------
# Batched letter scoring
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_base(tiny_base_dir):
    from qwen import QWenLMHeadModel, QWenTokenizer

    return QWenLMHeadModel.from_pretrained(tiny_base_dir).eval(), QWenTokenizer.from_pretrained(tiny_base_dir)


def test_batched_letter_scores_equal_one_prompt_at_a_time(tiny_base):
    model, tokenizer = tiny_base
    subjects = read_choice_subjects(DATA / "mmlu", MMLU_LAYOUT)
    # Prompts of very different lengths (0 or 5 shots), so batches are heavily left-padded, and some longer than
    # the tiny model's seq_length (256), where dynamic NTK and logn scaling read each prompt's own length.
    prompts = [tokenizer.encode(mmlu_base_prompt(s.name, s.dev[:shots], q), allowed_special=set())
               for s in subjects for q in s.questions for shots in (0, 5)]
    assert min(map(len, prompts)) < 100 and max(map(len, prompts)) > model.config.seq_length
    candidates = [tokenizer.encode(f" {letter}")[0] for letter in "ABCD"]
    batched = torch.tensor(next_token_logprobs(model, prompts, candidates, tokenizer.eod_id, batch_size=8))
    alone = torch.tensor(next_token_logprobs(model, prompts, candidates, tokenizer.eod_id, batch_size=1))
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)
    assert batched.argmax(-1).tolist() == alone.argmax(-1).tolist()
    # And both are the plain model's next-token log-probabilities, computed here without any padding.
    with torch.no_grad():
        reference = torch.stack([model(torch.tensor([p]), logits_to_keep=1).logits[0, -1].float()
                                 .log_softmax(-1)[candidates] for p in prompts])
    torch.testing.assert_close(batched, reference, atol=1e-4, rtol=1e-4)


def _letter_logprobs(model, ids: list[int], candidates: list[int]) -> list[float]:
    """The plain model's next-token log-probabilities of `candidates` after `ids`, one unpadded prompt."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1].float()
    return logits.log_softmax(-1)[candidates].tolist()


def test_base_prompts_are_cut_where_the_original_scripts_cut_them(tiny_base, tiny_base_dir, tmp_path, monkeypatch):
    # The original MMLU script cut a prompt longer than --max-seq-len (default 2048) to its last max_seq_len - 1
    # tokens; its C-Eval and CMMLU scripts took the same flag and never cut. Batch size 8, ours, against the
    # original's one prompt at a time: the letters are the plain model's on the prompt the original would feed.
    model, tokenizer = tiny_base
    for benchmark in (tasks.MMLU, tasks.CEVAL, tasks.CMMLU):
        assert tasks.choice_base_parser(benchmark).parse_args(["-d", "x"]).max_seq_len == 2048
    for benchmark, layout, prefix in ((tasks.MMLU, MMLU_LAYOUT, " "), (tasks.CEVAL, CEVAL_LAYOUT, "")):
        subjects = read_choice_subjects(DATA / benchmark.key, layout)
        full = {(s.name, i): tokenizer.encode(benchmark.base_prompt(s.name, s.dev[:5], q), allowed_special=set())
                for s in subjects for i, q in enumerate(s.questions)}
        lengths = sorted(map(len, full.values()))
        limit = lengths[len(lengths) // 2]  # about half the prompts are longer
        assert lengths[0] <= limit < lengths[-1]
        out = tmp_path / benchmark.key
        arguments = ["-c", str(tiny_base_dir), "-d", str(DATA / benchmark.key), "-o", str(out), "--batch-size", "8",
                     "--max-seq-len", str(limit)]
        assert run_script(f"evaluate_{benchmark.key}.py", arguments, monkeypatch) == 0
        candidates = [tokenizer.encode(prefix + letter)[0] for letter in "ABCD"]
        cut = 0
        for (subject, index), ids in full.items():
            record = next(r for r in map(json.loads, (out / "items" / f"{subject}.jsonl").read_text().splitlines())
                          if r["id"] == index)
            fed = ids[len(ids) - limit + 1:] if benchmark is tasks.MMLU and len(ids) > limit else ids
            cut += fed is not ids
            assert list(record["logprobs"].values()) == pytest.approx(_letter_logprobs(model, fed, candidates),
                                                                      abs=1e-4)
            assert record["prediction"] == "ABCD"[max(range(4), key=lambda k: list(record["logprobs"].values())[k])]
            assert record.get("truncated", False) == (fed is not ids)
        results = json.loads((out / "results.json").read_text(encoding="utf-8"))
        if benchmark is tasks.MMLU:
            assert cut > 0 and results["truncated_prompts"] == cut
        else:
            assert cut == 0 and "truncated_prompts" not in results


# --------------------------------------------------------------------------------------------------------------------
# Result files
# --------------------------------------------------------------------------------------------------------------------


def test_result_store_resumes_and_refuses_other_settings(tmp_path):
    store = ResultStore(tmp_path, {"benchmark": "mmlu", "shots": 5})
    store.append("law", {"id": 0, "correct": True})
    store.append("law", {"id": 1, "correct": False})
    with store.path_of("law").open("a", encoding="utf-8") as handle:
        handle.write('{"id": 2, "corr')  # a crash in the middle of a line
    again = ResultStore(tmp_path, {"benchmark": "mmlu", "shots": 5})
    assert sorted(again.load("law")) == ["0", "1"]
    again.append("law", {"id": 2, "correct": True})  # the broken tail was cut, so this is a clean line
    assert sorted(again.load("law")) == ["0", "1", "2"]
    with pytest.raises(ResultsMismatchError, match=r"another run \(different shots\).*--overwrite"):
        ResultStore(tmp_path, {"benchmark": "mmlu", "shots": 3})
    fresh = ResultStore(tmp_path, {"benchmark": "mmlu", "shots": 3}, overwrite=True)
    assert fresh.load("law") == {}


def test_micro_and_macro_averages():
    records = {"a": [{"correct": True}] * 3 + [{"correct": False}], "b": [{"correct": False}, {"correct": True}]}
    micro = accuracy_summary(records, "micro", {"both": ["a", "b"], "only b": ["b"], "absent": ["c"]})
    assert micro["subjects"]["a"] == {"correct": 3, "total": 4, "accuracy": 75.0}
    assert micro["overall"]["accuracy"] == pytest.approx(100 * 4 / 6)
    assert micro["categories"]["only b"]["accuracy"] == 50.0 and "absent" not in micro["categories"]
    macro = accuracy_summary(records, "macro")
    assert macro["overall"]["accuracy"] == pytest.approx((75.0 + 50.0) / 2)


def test_category_rows_are_those_the_original_scripts_printed():
    # MMLU: the original script's four groups, names and order (anatomy in stem, unlike the MMLU paper's grouping);
    # C-Eval: C-Eval's four and "Hard"; CMMLU: five, "China specific" overlapping the others.
    mmlu = tasks.MMLU.categories
    assert [(name, len(subjects)) for name, subjects in mmlu.items()] == [
        ("stem", 19), ("Humanities", 13), ("other", 13), ("social", 12)]
    assert "anatomy" in mmlu["stem"] and len({s for subjects in mmlu.values() for s in subjects}) == 57
    assert [(name, len(subjects)) for name, subjects in tasks.CEVAL.categories.items()] == [
        ("STEM", 20), ("Social Science", 10), ("Humanities", 11), ("Other", 11), ("Hard", 8)]
    assert [(name, len(subjects)) for name, subjects in tasks.CMMLU.categories.items()] == [
        ("STEM", 17), ("Humanities", 13), ("Social Science", 22), ("Other", 15), ("China specific", 15)]


# --------------------------------------------------------------------------------------------------------------------
# The scripts, end to end
# --------------------------------------------------------------------------------------------------------------------

# script, kind of checkpoint, data folder, extra arguments, number of evaluated items
SCRIPTS = {
    "evaluate_mmlu.py": ("base", "mmlu", [], 5),
    "evaluate_ceval.py": ("base", "ceval", [], 5),
    "evaluate_cmmlu.py": ("base", "cmmlu", [], 5),
    "evaluate_gsm8k.py": ("base", "gsm8k", ["--max-new-tokens", "8", "--prompt-file", str(EXEMPLARS)], 4),
    "evaluate_humaneval.py": ("base", "humaneval", ["--max-new-tokens", "8"], 3),
    "evaluate_chat_mmlu.py": ("chat", "mmlu", ["--max-new-tokens", "8"], 5),
    "evaluate_chat_ceval.py": ("chat", "ceval", ["--max-new-tokens", "8"], 5),
    "evaluate_chat_gsm8k.py": ("chat", "gsm8k", ["--max-new-tokens", "8"], 4),
    "evaluate_chat_humaneval.py": ("chat", "humaneval", ["--max-new-tokens", "8"], 3),
    "evaluate_plugin.py": ("chat", "plugin", ["--max-new-tokens", "8"], 3),
}


def _arguments(script: str, checkpoints: dict[str, Path], out: Path) -> list[str]:
    kind, data, extra, _ = SCRIPTS[script]
    return ["-c", str(checkpoints[kind]), "-d", str(DATA / data), "-o", str(out), "--batch-size", "3", *extra]


def run_script(script: str, arguments: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """Run an eval/ script file in this process as `python eval/<script> <arguments>` would."""
    monkeypatch.setattr(sys, "argv", [str(EVAL / script), *arguments])
    try:
        runpy.run_path(str(EVAL / script), run_name="__main__")
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    return 0


def check_results(script: str, out: Path) -> dict:
    """The results file is complete and agrees with the per-item records next to it."""
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    items = [json.loads(line) for path in sorted((out / "items").glob("*.jsonl"))
             for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(items) == SCRIPTS[script][3]
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["checkpoint"]
    if script == "evaluate_plugin.py":
        for key in ("tool_selection_accuracy", "action_input_rouge_l", "false_positive_rate"):
            assert 0 <= results[key] <= 100
        assert (results["positive_samples"], results["negative_samples"]) == (2, 1)
        return results
    overall = results["overall"]
    assert overall["total"] == len(items)
    if "humaneval" in script:
        assert set(results["tasks"]) == {item["id"] for item in items}
        assert overall["correct"] == sum(t["status"] == "passed" for t in results["tasks"].values())
        assert results["pass@1"] == overall["accuracy"] and results["sandbox"]["timeout_s"] > 0
        assert results["sandbox"]["isolated"] is True, results["sandbox"]
        samples = [json.loads(line) for line in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
        assert [s["task_id"] for s in samples] == ["Fixture/0", "Fixture/1", "Fixture/2"]
        return results
    assert overall["correct"] == sum(item["correct"] for item in items)
    for score in results["subjects"].values():
        assert score["accuracy"] == pytest.approx(100 * score["correct"] / score["total"])
    if "gsm8k" not in script:
        assert all(item["prediction"] in LETTERS and item["answer"] in LETTERS for item in items)
    return results


@pytest.fixture(scope="module")
def checkpoints(tiny_base_dir, tiny_chat_dir) -> dict[str, Path]:
    return {"base": tiny_base_dir, "chat": tiny_chat_dir}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_script_end_to_end(script, checkpoints, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert run_script(script, _arguments(script, checkpoints, out), monkeypatch) == 0
    check_results(script, out)
    printed = capsys.readouterr()
    assert "results: " in printed.out and "%" in printed.out  # the table
    assert "%|" in printed.err  # the progress bar


def _greedy_reply(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, repetition_penalty: float) -> str:
    """A chat reply decoded greedily by hand with the plain model: the argmax token after dividing (multiplying,
    when negative) the logit of every token already in the sequence by `repetition_penalty`."""
    ids, ends = list(prompt_ids), {tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id}
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1].float()
        seen = torch.tensor(sorted(set(ids)))
        logits[seen] = torch.where(logits[seen] < 0, logits[seen] * repetition_penalty,
                                   logits[seen] / repetition_penalty)
        token = int(logits.argmax())
        if token in ends:
            break
        ids.append(token)
    return tokenizer.decode(ids[len(prompt_ids):]).strip()


def test_chat_replies_are_greedy_without_repetition_penalty(tiny_chat_dir, tiny_chat_model, tmp_path, monkeypatch):
    # The original chat scripts set repetition_penalty = 1.0 whatever the checkpoint's generation_config.json says.
    # This copy of the tiny chat checkpoint asks for 0.5 (seen tokens favoured), which changes its replies: the
    # script's replies must be the plain greedy ones all the same.
    import shutil

    from qwen import QWenTokenizer
    from qwen.qwen_generation_utils import make_context

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_chat_dir, checkpoint)
    config_path = checkpoint / "generation_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config_path.write_text(json.dumps({**config, "repetition_penalty": 0.5}), encoding="utf-8")
    tokenizer = QWenTokenizer.from_pretrained(checkpoint)
    out = tmp_path / "out"
    arguments = ["-c", str(checkpoint), "-d", str(DATA / "mmlu"), "-o", str(out), "--max-new-tokens", "12",
                 "--limit", "1"]
    assert run_script("evaluate_chat_mmlu.py", arguments, monkeypatch) == 0
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["repetition_penalty"] == 1.0
    penalized_differs = False
    for subject in read_choice_subjects(DATA / "mmlu", MMLU_LAYOUT):
        records = {r["id"]: r for r in map(json.loads, (out / "items" / f"{subject.name}.jsonl").read_text()
                                           .splitlines())}
        for index, question in enumerate(subject.questions[:1]):
            query = tasks.MMLU.chat_prompt(question)
            _, ids = make_context(tokenizer, query, history=[], system="You are a helpful assistant.")
            assert records[index]["response"] == _greedy_reply(tiny_chat_model, tokenizer, ids, 12, 1.0)
            penalized_differs |= records[index]["response"] != _greedy_reply(tiny_chat_model, tokenizer, ids, 12, 0.5)
    assert penalized_differs


def test_rerun_skips_finished_subjects_and_overwrite_recomputes(checkpoints, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    arguments = _arguments("evaluate_mmlu.py", checkpoints, out)
    assert run_script("evaluate_mmlu.py", arguments, monkeypatch) == 0
    first = json.loads((out / "results.json").read_text(encoding="utf-8"))
    # Mark every saved world_religions answer correct: a rerun that reuses the file reports 2/2 for it.
    path = out / "items" / "world_religions.jsonl"
    path.write_text("".join(json.dumps({**json.loads(line), "correct": True}) + "\n"
                            for line in path.read_text(encoding="utf-8").splitlines()), encoding="utf-8")
    # Drop one abstract_algebra answer: only that one is computed again.
    algebra = out / "items" / "abstract_algebra.jsonl"
    lines = algebra.read_text(encoding="utf-8").splitlines()
    algebra.write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert run_script("evaluate_mmlu.py", arguments, monkeypatch) == 0
    printed = capsys.readouterr()
    assert "world_religions: all 2 answers already in" in printed.err
    assert "abstract_algebra: all" not in printed.err and "| 1/1" in printed.err
    second = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert second["subjects"]["world_religions"]["correct"] == 2
    assert second["subjects"]["abstract_algebra"] == first["subjects"]["abstract_algebra"]
    assert run_script("evaluate_mmlu.py", [*arguments, "--overwrite"], monkeypatch) == 0
    assert json.loads((out / "results.json").read_text(encoding="utf-8"))["subjects"] == first["subjects"]


def test_user_errors_end_with_one_line(checkpoints, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    arguments = _arguments("evaluate_mmlu.py", checkpoints, out)
    assert run_script("evaluate_mmlu.py", arguments, monkeypatch) == 0
    with pytest.raises(SystemExit, match=r"^error: .* holds results of another run \(different shots\)"):
        runpy_args = [*arguments, "--shots", "2"]
        monkeypatch.setattr(sys, "argv", ["evaluate_mmlu.py", *runpy_args])
        runpy.run_path(str(EVAL / "evaluate_mmlu.py"), run_name="__main__")
    with pytest.raises(SystemExit, match=r"^error: .*nowhere.* does not exist. Expected a folder with dev/"):
        monkeypatch.setattr(sys, "argv", ["evaluate_mmlu.py", "-c", str(checkpoints["base"]), "-d",
                                          str(tmp_path / "nowhere")])
        runpy.run_path(str(EVAL / "evaluate_mmlu.py"), run_name="__main__")
    with pytest.raises(SystemExit, match=r"^error: this checkpoint is a base model .* Use eval/evaluate_mmlu.py"):
        monkeypatch.setattr(sys, "argv", ["evaluate_chat_mmlu.py", "-c", str(checkpoints["base"]), "-d",
                                          str(DATA / "mmlu"), "-o", str(tmp_path / "chat")])
        runpy.run_path(str(EVAL / "evaluate_chat_mmlu.py"), run_name="__main__")


def test_humaneval_refuses_to_run_model_code_without_isolation_unless_allowed(checkpoints, tmp_path, monkeypatch,
                                                                             capsys):
    arguments = _arguments("evaluate_humaneval.py", checkpoints, tmp_path / "out")
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without bwrap
    # Refused before the model loads: with a checkpoint that does not exist, the sandbox's error still comes first.
    nowhere = ["-c", str(tmp_path / "nowhere"), *arguments[2:]]
    with pytest.raises(SystemExit, match=r"^error: cannot isolate model-written programs: 'bwrap' is not installed\. "
                                         r"Install bubblewrap \(apt-get install bubblewrap\), or pass "
                                         r"--allow-unsafe-execution .*\.$"):
        monkeypatch.setattr(sys, "argv", ["evaluate_humaneval.py", *nowhere])
        runpy.run_path(str(EVAL / "evaluate_humaneval.py"), run_name="__main__")
    assert not (tmp_path / "out").exists()
    capsys.readouterr()
    assert run_script("evaluate_humaneval.py", [*arguments, "--allow-unsafe-execution"], monkeypatch) == 0
    printed = capsys.readouterr().err
    assert "WARNING: model-written programs will run WITHOUT isolation (--allow-unsafe-execution)" in printed
    assert "WARNING: these programs ran WITHOUT isolation" in printed
    sandbox = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))["sandbox"]
    assert sandbox["isolated"] is False and sandbox["isolation"].startswith("NONE (--allow-unsafe-execution)")


def test_tool_use_scores_of_a_model_trained_to_call_the_tool(tool_chat_dir, tmp_path, monkeypatch):
    # tool_chat_dir was trained to answer the fixture's weather prompt with exactly
    # 'Thought: ...\nAction: get_weather\nAction Input: {"city": "Paris"}\nObservation:'. Positive sample 1 expects
    # that call, sample 2 the same input to another tool (get_time); the negative sample expects no call.
    out = tmp_path / "out"
    arguments = ["-c", str(tool_chat_dir), "-d", str(DATA / "plugin"), "-o", str(out)]
    assert run_script("evaluate_plugin.py", arguments, monkeypatch) == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["tool_selection_accuracy"] == 50.0  # get_weather right, get_time wrong
    assert results["action_input_rouge_l"] == 100.0  # both references' inputs equal the reply's
    assert results["false_positive_rate"] == 100.0  # it calls the tool where none was wanted
    positive = [json.loads(line) for line in (out / "items" / "positive.jsonl").read_text().splitlines()]
    assert [(p["tool"], p["reference_tool"], p["selected"]) for p in positive] == [
        ("get_weather", "get_weather", True), ("get_weather", "get_time", False)]


# --------------------------------------------------------------------------------------------------------------------
# The original scripts' spellings and defaults
# --------------------------------------------------------------------------------------------------------------------

# script -> (its parser, an original command line's arguments, the values they must give)
ORIGINAL_COMMAND_LINES = {
    "evaluate_mmlu.py": (lambda: tasks.choice_base_parser(tasks.MMLU), [
        "-d", "data/mmlu/data/", "-s", "7", "--debug", "--batch-size", "2", "--max-seq-len", "2048"],
        {"checkpoint_path": "Qwen/Qwen-7B", "data_dir": "data/mmlu/data/", "seed": 7, "debug": True, "batch_size": 2,
         "max_seq_len": 2048}),
    "evaluate_ceval.py": (lambda: tasks.choice_base_parser(tasks.CEVAL), ["--eval_data_path", "data/ceval/"],
                          {"checkpoint_path": "Qwen/Qwen-7B", "data_dir": "data/ceval/", "seed": 1234,
                           "debug": False}),
    "evaluate_cmmlu.py": (lambda: tasks.choice_base_parser(tasks.CMMLU), ["-d", "data/cmmlu/", "--seed", "3"],
                          {"checkpoint_path": "Qwen/Qwen-7B", "data_dir": "data/cmmlu/", "seed": 3}),
    "evaluate_chat_mmlu.py": (lambda: tasks.choice_chat_parser(tasks.MMLU), [
        "--eval_data_path", "data/mmlu/data/", "--debug", "--overwrite"],
        {"checkpoint_path": "Qwen/Qwen-7B-Chat", "data_dir": "data/mmlu/data/", "debug": True, "overwrite": True}),
    "evaluate_chat_ceval.py": (lambda: tasks.choice_chat_parser(tasks.CEVAL), ["-d", "data/ceval/", "-s", "5"],
                               {"checkpoint_path": "Qwen/Qwen-7B-Chat", "data_dir": "data/ceval/", "seed": 5}),
    "evaluate_gsm8k.py": (lambda: tasks.gsm8k_parser(chat=False), ["-f", "gsm8k", "-o", "gsm8k_res.jsonl"],
                          {"checkpoint_path": "Qwen/Qwen-7B", "data_dir": "gsm8k", "output_dir": "eval_results/gsm8k",
                           "sample_output_file": "gsm8k_res.jsonl"}),
    "evaluate_chat_gsm8k.py": (lambda: tasks.gsm8k_parser(chat=True), [
        "--sample-input-file", "gsm8k", "--sample-output-file", "res.jsonl", "--use-fewshot"],
        {"checkpoint_path": "Qwen/Qwen-7B-Chat", "data_dir": "gsm8k", "sample_output_file": "res.jsonl",
         "use_fewshot": True}),
    "evaluate_humaneval.py": (lambda: tasks.humaneval_parser(chat=False), [
        "-f", "HumanEval.jsonl", "-o", "HumanEval_res.jsonl"],
        {"checkpoint_path": "Qwen/Qwen-7B", "data_dir": "HumanEval.jsonl", "output_dir": "eval_results/humaneval",
         "sample_output_file": "HumanEval_res.jsonl"}),
    "evaluate_chat_humaneval.py": (lambda: tasks.humaneval_parser(chat=True), [
        "-f", "HumanEval.jsonl", "-o", "HumanEval_res_chat.jsonl"],
        {"checkpoint_path": "Qwen/Qwen-7B-Chat", "sample_output_file": "HumanEval_res_chat.jsonl"}),
    "evaluate_plugin.py": (tasks.tool_use_parser, [
        "-s", "9", "--eval-react-positive", "--eval-react-positive-filename", "p.jsonl",
        "--eval-react-negative-filename", "n.jsonl"],
        {"checkpoint_path": "Qwen/Qwen-7B-Chat", "data_dir": str(EVAL / "data"), "seed": 9,
         "eval_react_positive": True, "eval_react_negative": False, "positive_file": "p.jsonl",
         "negative_file": "n.jsonl"}),
}


@pytest.mark.parametrize("script", list(ORIGINAL_COMMAND_LINES))
def test_original_command_lines_parse_to_their_meaning(script, monkeypatch, capsys):
    make_parser, arguments, expected = ORIGINAL_COMMAND_LINES[script]
    parsed = vars(make_parser().parse_args(arguments))
    assert {key: parsed[key] for key in expected} == expected
    # The script file itself offers each original spelling used above.
    assert run_script(script, ["--help"], monkeypatch) == 0
    usage = capsys.readouterr().out
    for option in (argument for argument in arguments if argument.startswith("-")):
        assert option in usage, (script, option)
    assert "-s SEED, --seed SEED" in usage and "--debug" in usage and "-c CHECKPOINT_PATH" in usage


def test_original_spellings_run_chat_gsm8k_few_shot_with_a_sample_file(checkpoints, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the results folder is the default one, under the working directory
    arguments = ["-c", str(checkpoints["chat"]), "-f", str(DATA / "gsm8k" / "test.jsonl"), "-o", "gsm8k_res.jsonl",
                 "--use-fewshot", "--debug", "-s", "1", "--max-new-tokens", "8", "--batch-size", "3",
                 "--prompt-file", str(EXEMPLARS)]
    assert run_script("evaluate_chat_gsm8k.py", arguments, monkeypatch) == 0
    printed = capsys.readouterr()
    out = tmp_path / "eval_results" / "chat_gsm8k"
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["mode"] == "chat, few-shot (exemplars.txt), greedy" and results["overall"]["total"] == 4
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["use_fewshot"] is True
    # The original's -o file: each problem with its completion and whether it was right.
    items = {item["id"]: item for item in map(json.loads, (out / "items" / "gsm8k.jsonl").read_text().splitlines())}
    samples = [json.loads(line) for line in (tmp_path / "gsm8k_res.jsonl").read_text(encoding="utf-8").splitlines()]
    problems = read_gsm8k(DATA / "gsm8k")
    assert [(s["question"], s["answer"]) for s in samples] == [(p.question, p.solution) for p in problems]
    assert [(s["completion"], s["acc"]) for s in samples] == [(items[i]["completion"], items[i]["correct"])
                                                              for i in range(4)]
    # --debug shows each prompt: the exemplars of the prompt file, then the question, in the user turn.
    assert printed.err.count("--- prompt ---") == 4
    first_exemplar = EXEMPLARS.read_text(encoding="utf-8").splitlines()[0]
    assert f"<|im_start|>user\n{first_exemplar}" in printed.err
    assert f"Question: {problems[0].question}\nLet's think step by step<|im_end|>" in printed.err


def test_original_spellings_run_humaneval_with_the_harness_file(checkpoints, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    arguments = ["-c", str(checkpoints["base"]), "-f", str(DATA / "humaneval" / "HumanEval.jsonl"),
                 "-o", "HumanEval_res.jsonl", "--max-new-tokens", "8", "--batch-size", "3"]
    assert run_script("evaluate_humaneval.py", arguments, monkeypatch) == 0
    out = tmp_path / "eval_results" / "humaneval"
    # What `evaluate_functional_correctness HumanEval_res.jsonl` reads: task_id and completion per line.
    assert (tmp_path / "HumanEval_res.jsonl").read_text(encoding="utf-8") == (out / "samples.jsonl").read_text(
        encoding="utf-8")


def test_original_spellings_choose_tool_use_groups(checkpoints, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    arguments = ["-c", str(checkpoints["chat"]), "-d", str(DATA / "plugin"), "-o", str(out), "--max-new-tokens", "8",
                 "--eval-react-negative"]
    assert run_script("evaluate_plugin.py", arguments, monkeypatch) == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["negative_samples"] == 1 and "positive_samples" not in results
    assert [path.name for path in (out / "items").iterdir()] == ["negative.jsonl"]
    with pytest.raises(SystemExit, match=r"^error: --eval-hfagent .* is not available"):
        monkeypatch.setattr(sys, "argv", ["evaluate_plugin.py", *arguments, "--eval-hfagent"])
        runpy.run_path(str(EVAL / "evaluate_plugin.py"), run_name="__main__")


def test_chat_humaneval_asks_with_the_original_prompt(checkpoints, tmp_path, monkeypatch, capsys):
    # The original's current chat prompt (HumanEvalPack's): the signature in an instruction, the docstring's lines
    # stripped, then the task's prompt, as one user turn after the default system prompt.
    arguments = _arguments("evaluate_chat_humaneval.py", checkpoints, tmp_path / "out")
    assert run_script("evaluate_chat_humaneval.py", [*arguments, "--debug", "--limit", "1"], monkeypatch) == 0
    task = read_humaneval(DATA / "humaneval")[0]
    assert task.prompt.startswith("from typing import List\n\n\ndef running_max(numbers: List[int]) -> List[int]:")
    user_turn = ("Write a Python function `running_max(numbers: List[int]) -> List[int]` to solve the following "
                 "problem:\nReturn the running maximum of a list: element i is the largest of numbers[:i + 1].\n"
                 ">>> running_max([1, 3, 2, 5])\n[1, 3, 3, 5]\n\n" + task.prompt)
    expected = (f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{user_turn}"
                "<|im_end|>\n<|im_start|>assistant\n")
    assert f"--- prompt ---\n{expected}\n--- answer ---" in capsys.readouterr().err


def test_chat_humaneval_keeps_the_helpers_the_original_dropped():
    # A right answer whose function calls a helper defined above it. The original kept only the lines after
    # `def running_max` (checked with its extract_code), and that program fails on the missing helper; the whole
    # fenced block is kept here, and passes. A wrong answer in the same shape still fails.
    from evalkit.sandbox import Sandbox, run_many
    from evalkit.scoring import chat_code_completion, humaneval_program

    task = read_humaneval(DATA / "humaneval")[0]
    body = ("    result, best = [], None\n    for number in numbers:\n        best = _larger(best, number)\n"
            "        result.append(best)\n    return result")
    reply = ("Here is the function:\n```python\ndef _larger(a, b):\n    return b if a is None else max(a, b)\n\n"
             f"def running_max(numbers):\n{body}\n```\nIt keeps the largest number so far.")
    original = body  # what the original's extraction returns for this reply
    ours = chat_code_completion(reply, task.entry_point)
    assert ours.startswith("\ndef _larger(a, b):") and ours.endswith(f"{body}\n")
    wrong = chat_code_completion(reply.replace("max(a, b)", "min(a, b)"), task.entry_point)
    programs = [humaneval_program(task.prompt, completion, task.test, task.entry_point)
                for completion in (original, ours, wrong)]
    results = run_many(programs, Sandbox(), workers=2)
    assert [r.status for r in results] == ["failed", "passed", "failed"], results
    assert "NameError: name '_larger' is not defined" in results[0].detail


def test_debug_prints_base_prompts_and_answers(checkpoints, tmp_path, monkeypatch, capsys):
    arguments = ["-c", str(checkpoints["base"]), "--eval_data_path", str(DATA / "ceval"), "-o", str(tmp_path / "out"),
                 "--debug", "--subjects", "logic"]
    assert run_script("evaluate_ceval.py", arguments, monkeypatch) == 0
    printed = capsys.readouterr().err
    assert printed.count("--- prompt ---") == 2 and printed.count('"logprobs"') == 2 and "答案：" in printed


# One script in the default run (a chat model, generation, the sandbox); all of them with -m slow.
SUBPROCESS_DEFAULT = ["evaluate_chat_humaneval.py"]


def _run_as_user(scripts: list[str], checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """`python eval/<script> ...` from the repository root, all at once (each mostly waits on imports)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    processes = {script: subprocess.Popen(
        [sys.executable, str(Path("eval") / script), *_arguments(script, checkpoints, tmp_path / script)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for script in scripts}
    for script, process in processes.items():
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output[-3000:]
        check_results(script, tmp_path / script)


def test_scripts_as_subprocesses(checkpoints, tmp_path):
    _run_as_user(SUBPROCESS_DEFAULT, checkpoints, tmp_path)


@pytest.mark.slow
def test_every_script_as_a_subprocess(checkpoints, tmp_path):
    _run_as_user([script for script in SCRIPTS if script not in SUBPROCESS_DEFAULT], checkpoints, tmp_path)
