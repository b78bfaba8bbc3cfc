"""What the `eval/` scripts run: the arguments they share and one function per kind of evaluation.

Every run reads its data first (a wrong `-d` fails in a second, before the model loads), loads the checkpoint with
`qwen.loading`, skips the questions already in its output folder, scores the rest in batches with a progress bar,
and writes `results.json` and a table. Problems a user can fix end the script with one `error:` line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm
from transformers import set_seed

from qwen.chat_turn import SamplingParams, chat_stop_token_ids, chat_turn, context_length
from qwen.loading import add_model_arguments, load_from_args
from qwen.qwen_generation_utils import DEFAULT_SYSTEM_PROMPT
from qwen.react import STOP_WORDS as REACT_STOP_WORDS

from . import prompts
from .data import (
    CEVAL_LAYOUT,
    CHOICES,
    CMMLU_LAYOUT,
    MMLU_LAYOUT,
    ChoiceLayout,
    DataLayoutError,
    Question,
    find_gsm8k_train,
    read_choice_subjects,
    read_gsm8k,
    read_humaneval,
    read_jsonl,
    read_tool_use,
)
from .inference import (
    cut_like_original_mmlu,
    fit_prompt,
    generate,
    greedy_params,
    iter_next_token_logprobs,
    running_engine,
)
from .results import ResultsMismatchError, ResultStore, accuracy_summary, format_table, write_json
from .sandbox import UNSAFE_FLAG, Sandbox, SandboxUnavailable, describe, require_isolation, run_many
from .scoring import (
    CHAT_GSM8K_TOLERANCE,
    COMPLETION_STOPS,
    chat_code_completion,
    extract_choice,
    extract_choice_chinese,
    extract_math_answer,
    format_number,
    humaneval_program,
    numbers_match,
    rouge_tokens,
    score_tool_call,
    summarize_tool_use,
    tool_call_of,
    truncate_at_stops,
)
from .subjects import CEVAL_CATEGORIES, CMMLU_CATEGORIES, MMLU_CATEGORIES

EVAL_DIR = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ChoiceBenchmark:
    key: str  # names the default output folder
    title: str
    layout: ChoiceLayout
    average: Literal["micro", "macro"]
    categories: dict[str, list[str]]
    base_prompt: Callable[[str, Sequence[Question], Question], str]
    letter_prefix: str  # what precedes the letter in the scored next token: " A" after "Answer:", "A" after "答案："
    chat_prompt: Callable[[Question], str] | None
    # The letter a chat reply picks and the rule that found it (reply, question): the original chat script's rules.
    chat_letter: Callable[[str, Question], tuple[str, str]] | None
    # Whether the base script cuts prompts longer than --max-seq-len: the original MMLU script did; its C-Eval and
    # CMMLU scripts took the flag but never used it.
    cuts_long_prompts: bool


MMLU = ChoiceBenchmark("mmlu", "MMLU", MMLU_LAYOUT, "micro", MMLU_CATEGORIES, prompts.mmlu_base_prompt, " ",
                       prompts.mmlu_chat_prompt, lambda reply, question: extract_choice(reply, question.options),
                       cuts_long_prompts=True)
CEVAL = ChoiceBenchmark("ceval", "C-Eval (val)", CEVAL_LAYOUT, "macro", CEVAL_CATEGORIES, prompts.chinese_base_prompt,
                        "", prompts.ceval_chat_prompt,
                        lambda reply, question: extract_choice_chinese(reply, question.text, question.options),
                        cuts_long_prompts=False)
CMMLU = ChoiceBenchmark("cmmlu", "CMMLU", CMMLU_LAYOUT, "macro", CMMLU_CATEGORIES, prompts.chinese_base_prompt, "",
                        None, None, cuts_long_prompts=False)


# --------------------------------------------------------------------------------------------------------------------
# Arguments and shared plumbing
# --------------------------------------------------------------------------------------------------------------------


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number of at least {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
    return value


# The original scripts' default checkpoints (-c): base models for the few-shot scripts, chat models for the others.
BASE_CHECKPOINT = "Qwen/Qwen-7B"
CHAT_CHECKPOINT = "Qwen/Qwen-7B-Chat"
DEFAULT_SEED = 1234  # the original scripts' -s default
ORIGINAL_MAX_SEQ_LEN = 2048  # the original multiple-choice scripts' --max-seq-len default
# The original chat scripts (MMLU, C-Eval, GSM8K, HumanEval) decode greedily with the repetition penalty turned off,
# whatever the checkpoint's generation_config.json says; its base and tool-use scripts keep the checkpoint's.
CHAT_REPETITION_PENALTY = 1.0
# The original's spellings of -d: --eval_data_path in the multiple-choice scripts, -f/--sample-input-file (a file) in
# the GSM8K and HumanEval ones.
CHOICE_DATA_ALIASES = ("--eval_data_path",)
FILE_DATA_ALIASES = ("-f", "--sample-input-file")


class _OutputDirOrSampleFile(argparse.Action):
    """`-o`: the results folder, or, for a name ending in .jsonl, the original scripts' sample output file."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, "sample_output_file" if str(values).endswith(".jsonl") else self.dest, values)


def _parser(description: str | None, output_name: str, data_help: str, generates: bool, chat: bool,
            data_aliases: Sequence[str] = (), data_default: str | None = None, sample_file: str | None = None
            ) -> argparse.ArgumentParser:
    """The options every script shares, with the original scripts' spellings and defaults where ours had none.

    `sample_file` (what the original wrote to -o) adds `--sample-output-file`, which -o FILE.jsonl also sets.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, default_checkpoint=CHAT_CHECKPOINT if chat else BASE_CHECKPOINT)
    default_note = "" if data_default is None else f" (default {data_default})"
    parser.add_argument("-d", "--data-dir", *data_aliases, required=data_default is None, default=data_default,
                        help=data_help + default_note)
    output_help = f"folder for the results; a rerun resumes there (default eval_results/{output_name})"
    if sample_file is None:
        parser.add_argument("-o", "--output-dir", default=str(Path("eval_results") / output_name), help=output_help)
    else:
        parser.add_argument("-o", "--output-dir", default=str(Path("eval_results") / output_name),
                            action=_OutputDirOrSampleFile, help=output_help + "; a name ending in .jsonl is the "
                            "--sample-output-file, as in the original script")
        parser.add_argument("--sample-output-file",
                            help=f"also write {sample_file} to this file (JSON lines), as the original script did")
    parser.add_argument("-s", "--seed", type=int, default=DEFAULT_SEED,
                        help=f"seed of the random number generators (default {DEFAULT_SEED}, as the original "
                             "scripts); decoding here is greedy, so the answers do not depend on it")
    parser.add_argument("--debug", action="store_true", help="print each prompt and the model's answer to stderr")
    parser.add_argument("--batch-size", type=_positive_int, default=8,
                        help="prompts run together in one forward pass (default 8)")
    parser.add_argument("--limit", type=_positive_int,
                        help="evaluate only the first N questions (of each subject): a quick partial run")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard the results already in the output folder instead of resuming")
    if generates:
        parser.add_argument("--max-new-tokens", type=_positive_int,
                            help="longest answer in tokens (default: the checkpoint's generation_config.json, or 512)")
    return parser


def _add_subjects_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subjects", type=lambda text: [name for name in text.split(",") if name],
                        help="comma-separated subjects to evaluate (default: every subject in the data folder)")


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    set_seed(args.seed)
    return args


def _debug(args: argparse.Namespace, tokenizer: Any, prompt_ids: Sequence[int], record: Mapping[str, Any]) -> None:
    """With --debug: the prompt as the model saw it and the saved record, on stderr."""
    if args.debug:
        print(f"\n--- prompt ---\n{tokenizer.decode(list(prompt_ids))}\n--- answer ---\n"
              f"{json.dumps(record, ensure_ascii=False)}", file=sys.stderr)


def _write_sample_file(path: str | None, records: Iterator[dict[str, Any]]) -> None:
    """The original script's -o file: one JSON object per line."""
    if path is not None:
        Path(path).write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records),
                              encoding="utf-8")
        print(f"samples: {path}")


@contextmanager
def _user_errors() -> Iterator[None]:
    """Problems the user can fix end the script with their one-line message; an interrupted run says how to resume."""
    try:
        yield
    except (DataLayoutError, ResultsMismatchError, SandboxUnavailable) as error:
        raise SystemExit(f"error: {error}") from None
    except KeyboardInterrupt:
        print("\ninterrupted; the answers so far are saved: run the same command again to resume.", file=sys.stderr)
        raise SystemExit(130) from None


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    model, tokenizer = load_from_args(args)
    # Prompts are cut where the original scripts cut them, and generation prompts to the engine's context; the
    # tokenizer's own "longer than the maximum length, indexing errors" warning (it knows only tokenizer_config's
    # model_max_length) would only mislead.
    tokenizer.model_max_length = sys.maxsize
    return model, tokenizer


def _checkpoint_name(name: str) -> str:
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _manifest(benchmark: str, mode: str, args: argparse.Namespace, model: Any, **settings: Any) -> dict[str, Any]:
    """What `run.json` records: everything that changes the answers, the precision the model really runs in included
    (`--dtype auto` is fp32 on a CPU and bf16 on a GPU). Batch size, limits and subject selection do not change
    answers, so a resumed run may change those."""
    return {"benchmark": benchmark, "mode": mode, "checkpoint": _checkpoint_name(args.checkpoint_path),
            "dtype": str(model.dtype).removeprefix("torch."), **settings}


def _chat_format(model: Any) -> str:
    return getattr(model.generation_config, "chat_format", None) or "chatml"


def _require_chat_model(model: Any, script_for_base: str | None) -> None:
    """Read from the checkpoint's generation config, never guessed from its name."""
    if _chat_format(model) != "chatml":
        hint = f" Use eval/{script_for_base} for base models." if script_for_base else ""
        raise SystemExit(
            "error: this checkpoint is a base model (its generation_config.json says chat_format "
            f"{_chat_format(model)!r}); this script evaluates chat models with the chat format.{hint}")


def _note_if_chat_model(model: Any) -> None:
    if _chat_format(model) == "chatml":
        print("note: this is a chat checkpoint; the published few-shot numbers of this script are for base models.",
              file=sys.stderr)


def _generation_params(model: Any, tokenizer: Any, max_new_tokens: int | None, chat: bool, base_script: str,
                       base_stops: Sequence[str]) -> SamplingParams:
    """Greedy settings for a script that has a chat and a base variant: the model kind is checked against the
    variant, and a reply ends where that kind's does (a chat turn's end, or <|endoftext|> and the benchmark's
    stop strings). Chat replies are decoded without repetition penalty, base ones with the checkpoint's."""
    if chat:
        _require_chat_model(model, base_script)
        return greedy_params(model.generation_config, max_new_tokens, chat_stop_token_ids(tokenizer),
                             repetition_penalty=CHAT_REPETITION_PENALTY)
    _note_if_chat_model(model)
    return greedy_params(model.generation_config, max_new_tokens, frozenset({tokenizer.eod_id}), base_stops)


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Benchmark text as plain text: a question that quotes `<|endoftext|>` gets those characters, not the token."""
    return tokenizer.encode(text, allowed_special=set(), disallowed_special=())


def _chat_prompt_ids(tokenizer: Any, model: Any, query: str) -> list[int]:
    """One user turn after the default system prompt, exactly what `model.chat(tokenizer, query)` feeds the model."""
    return chat_turn(tokenizer, query, [], DEFAULT_SYSTEM_PROMPT, model.generation_config,
                     context_length(model.config)).prompt_ids


def _generation_room(engine: Any, max_new_tokens: int) -> int:
    """How many prompt tokens leave room for the answer (at least half the context stays for the prompt)."""
    return max(1, engine.max_context - min(max_new_tokens, engine.max_context // 2))


def _progress(total: int, description: str, unit: str) -> tqdm:
    return tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True, file=sys.stderr)


def _finish(output_dir: Path, title: str, results: dict[str, Any]) -> None:
    write_json(output_dir / "results.json", results)
    print(format_table(title, results))
    print(f"\nresults: {output_dir / 'results.json'}")


# --------------------------------------------------------------------------------------------------------------------
# Multiple choice
# --------------------------------------------------------------------------------------------------------------------


def _pending(store: ResultStore, subjects: Sequence[Any]) -> list[tuple[Any, int, Question]]:
    """(subject, index, question) for every question without a saved answer; says which subjects are complete."""
    jobs = []
    for subject in subjects:
        done = store.load(subject.name)
        todo = [(subject, index, question) for index, question in enumerate(subject.questions)
                if str(index) not in done]
        if not todo:
            print(f"{subject.name}: all {len(subject.questions)} answers already in {store.path_of(subject.name)}, "
                  "skipped", file=sys.stderr)
        jobs.extend(todo)
    return jobs


def _records(store: ResultStore, subjects: Sequence[Any]) -> dict[str, list[dict[str, Any]]]:
    """The saved records of the questions of this run (a record of a question beyond --limit does not count)."""
    result = {}
    for subject in subjects:
        saved = store.load(subject.name)
        result[subject.name] = [saved[str(index)] for index in range(len(subject.questions)) if str(index) in saved]
    return result


def _single_token(tokenizer: Any, text: str) -> int:
    ids = _encode(tokenizer, text)
    if len(ids) != 1:
        raise RuntimeError(f"{text!r} is {len(ids)} tokens for this tokenizer; letter scoring needs one.")
    return ids[0]


def choice_base_parser(benchmark: ChoiceBenchmark, description: str | None = None) -> argparse.ArgumentParser:
    parser = _parser(description, benchmark.key, f"{benchmark.layout.name} data folder: "
                     f"{benchmark.layout.describe()}", generates=False, chat=False, data_aliases=CHOICE_DATA_ALIASES)
    _add_subjects_argument(parser)
    parser.add_argument("--shots", type=_non_negative_int, default=5,
                        help="solved examples from the dev split before each question (default 5)")
    if benchmark.cuts_long_prompts:
        parser.add_argument("--max-seq-len", type=_int_at_least(2), default=ORIGINAL_MAX_SEQ_LEN,
                            help="a prompt longer than this many tokens loses its beginning and keeps its last "
                                 f"MAX_SEQ_LEN - 1 tokens, as in the original script (default {ORIGINAL_MAX_SEQ_LEN})")
    else:
        parser.add_argument("--max-seq-len", type=_positive_int, default=ORIGINAL_MAX_SEQ_LEN,
                            help="accepted for the original script's command lines, which took it but never used "
                                 "it: prompts are not cut")
    return parser


def run_choice_base(benchmark: ChoiceBenchmark, argv: Sequence[str] | None = None, description: str | None = None
                    ) -> int:
    """Few-shot multiple choice for base models: the letter with the highest next-token log-probability wins."""
    args = _parse(choice_base_parser(benchmark, description), argv)
    with _user_errors():
        subjects = read_choice_subjects(args.data_dir, benchmark.layout, args.subjects, args.limit)
        for subject in subjects:
            if len(subject.dev) < args.shots:
                raise DataLayoutError(f"subject {subject.name!r} has {len(subject.dev)} dev examples; --shots "
                                      f"{args.shots} needs that many.")
        model, tokenizer = _load(args)
        _note_if_chat_model(model)
        output_dir = Path(args.output_dir)
        settings: dict[str, Any] = {"shots": args.shots}
        if benchmark.cuts_long_prompts:
            settings["max_seq_len"] = args.max_seq_len
        store = ResultStore(output_dir, _manifest(benchmark.key, "base", args, model, **settings), args.overwrite)
        candidates = [_single_token(tokenizer, benchmark.letter_prefix + letter) for letter in CHOICES]
        jobs = _pending(store, subjects)
        prompt_ids, truncated = [], []
        for subject, _, question in jobs:
            ids = _encode(tokenizer, benchmark.base_prompt(subject.name, subject.dev[:args.shots], question))
            cut = False
            if benchmark.cuts_long_prompts:
                ids, cut = cut_like_original_mmlu(ids, args.max_seq_len)
            prompt_ids.append(ids)
            truncated.append(cut)
        with _progress(len(jobs), f"{benchmark.title} {args.shots}-shot", "question") as bar:
            for job, scores in iter_next_token_logprobs(model, prompt_ids, candidates, tokenizer.eod_id,
                                                        args.batch_size):
                subject, index, question = jobs[job]
                prediction = CHOICES[scores.index(max(scores))]
                record = {
                    "id": index, "answer": question.answer, "prediction": prediction,
                    "correct": prediction == question.answer, "logprobs": dict(zip(CHOICES, scores, strict=True)),
                }
                if benchmark.cuts_long_prompts:
                    record["truncated"] = truncated[job]
                store.append(subject.name, record)
                _debug(args, tokenizer, prompt_ids[job], record)
                bar.update(1)
        records = _records(store, subjects)
        summary = accuracy_summary(records, benchmark.average, benchmark.categories)
        results: dict[str, Any] = {"benchmark": benchmark.title,
                                   "mode": f"base, {args.shots}-shot, next-token letter scores",
                                   "checkpoint": _checkpoint_name(args.checkpoint_path)}
        if benchmark.cuts_long_prompts:
            results["truncated_prompts"] = sum(bool(r.get("truncated")) for items in records.values() for r in items)
        results.update(summary)
        _finish(output_dir, f"{benchmark.title}, {args.shots}-shot", results)
    return 0


def choice_chat_parser(benchmark: ChoiceBenchmark, description: str | None = None) -> argparse.ArgumentParser:
    parser = _parser(description, f"chat_{benchmark.key}", f"{benchmark.layout.name} data folder: "
                     f"{benchmark.layout.describe()}", generates=True, chat=True, data_aliases=CHOICE_DATA_ALIASES)
    _add_subjects_argument(parser)
    return parser


def run_choice_chat(benchmark: ChoiceBenchmark, argv: Sequence[str] | None = None, description: str | None = None
                    ) -> int:
    """Zero-shot multiple choice for chat models: a greedy reply, and the letter it picks (the benchmark's chat_letter)."""
    if benchmark.chat_prompt is None or benchmark.chat_letter is None:
        raise ValueError(f"{benchmark.title} has no chat prompt")
    args = _parse(choice_chat_parser(benchmark, description), argv)
    with _user_errors():
        subjects = read_choice_subjects(args.data_dir, benchmark.layout, args.subjects, args.limit)
        model, tokenizer = _load(args)
        _require_chat_model(model, f"evaluate_{benchmark.key}.py")
        params = greedy_params(model.generation_config, args.max_new_tokens, chat_stop_token_ids(tokenizer),
                               repetition_penalty=CHAT_REPETITION_PENALTY)
        output_dir = Path(args.output_dir)
        manifest = _manifest(benchmark.key, "chat", args, model, max_new_tokens=params.max_new_tokens,
                             repetition_penalty=params.repetition_penalty)
        store = ResultStore(output_dir, manifest, args.overwrite)
        jobs = _pending(store, subjects)
        with running_engine(model, tokenizer, args.batch_size) as engine, \
                _progress(len(jobs), f"{benchmark.title} chat", "question") as bar:
            room = _generation_room(engine, params.max_new_tokens)
            prompt_ids = [fit_prompt(_chat_prompt_ids(tokenizer, model, benchmark.chat_prompt(question)), room)[0]
                          for _, _, question in jobs]

            def save(job: int, text: str, finish_reason: str) -> None:
                subject, index, question = jobs[job]
                response = text.strip()
                prediction, rule = benchmark.chat_letter(response, question)
                record = {
                    "id": index, "answer": question.answer, "prediction": prediction, "rule": rule,
                    "correct": prediction == question.answer, "response": response,
                }
                store.append(subject.name, record)
                _debug(args, tokenizer, prompt_ids[job], record)
                bar.update(1)

            generate(engine, prompt_ids, params, save)
        summary = accuracy_summary(_records(store, subjects), benchmark.average, benchmark.categories)
        results = {"benchmark": benchmark.title, "mode": "chat, 0-shot, greedy reply, letter extracted",
                   "checkpoint": _checkpoint_name(args.checkpoint_path), **summary}
        _finish(output_dir, f"{benchmark.title}, chat 0-shot", results)
    return 0


# --------------------------------------------------------------------------------------------------------------------
# GSM8K
# --------------------------------------------------------------------------------------------------------------------


def gsm8k_parser(chat: bool, description: str | None = None) -> argparse.ArgumentParser:
    parser = _parser(description, "chat_gsm8k" if chat else "gsm8k",
                     "folder holding GSM8K's test.jsonl (or the file itself)", generates=True, chat=chat,
                     data_aliases=FILE_DATA_ALIASES, sample_file="each problem with its completion and acc")
    shots = "four" if chat else "eight"
    parser.add_argument("--train-file",
                        help=f"GSM8K's train.jsonl, of which the original's {shots} few-shot exemplars are problems "
                             "(default: train.jsonl next to test.jsonl)")
    parser.add_argument("--prompt-file",
                        help="a file of few-shot exemplars of your own to put before each question, instead of the "
                             "original's" + ("; chat models get them with --use-fewshot" if chat else ""))
    if chat:
        parser.add_argument("--use-fewshot", action="store_true",
                            help="put the few-shot exemplars before the question in the user turn (default: the "
                                 "bare question, zero-shot)")
    return parser


def run_gsm8k(chat: bool, argv: Sequence[str] | None = None, description: str | None = None) -> int:
    """GSM8K: base models continue the few-shot exemplars, chat models answer the bare question (or, with
    --use-fewshot, the exemplars and the question); the answer is the number `scoring.extract_math_answer` reads from
    the solution, compared exactly with the reference."""
    args = _parse(gsm8k_parser(chat, description), argv)
    few_shot = not chat or args.use_fewshot
    tolerance = CHAT_GSM8K_TOLERANCE if chat else Decimal(0)
    with _user_errors():
        problems = read_gsm8k(args.data_dir, args.limit)
        exemplars = ""
        if few_shot and args.prompt_file is not None:
            prompt_file = Path(args.prompt_file)
            if not prompt_file.is_file():
                raise DataLayoutError(f"Few-shot prompt file {str(prompt_file)!r} does not exist.")
            exemplars = prompt_file.read_text(encoding="utf-8")
        elif few_shot:
            train = find_gsm8k_train(args.data_dir, args.train_file)
            exemplars = prompts.gsm8k_exemplars(read_jsonl(train, ["question", "answer"], "GSM8K"),
                                                prompts.GSM8K_CHAT_EXEMPLARS if chat else prompts.GSM8K_BASE_EXEMPLARS,
                                                str(train))
        model, tokenizer = _load(args)
        params = _generation_params(model, tokenizer, args.max_new_tokens, chat, "evaluate_gsm8k.py",
                                    prompts.GSM8K_STOPS)
        settings: dict[str, Any] = {"max_new_tokens": params.max_new_tokens,
                                    "repetition_penalty": params.repetition_penalty}
        if chat and few_shot:
            settings["use_fewshot"] = True
        if few_shot:
            settings["prompt_sha256"] = hashlib.sha256(exemplars.encode("utf-8")).hexdigest()
        output_dir = Path(args.output_dir)
        store = ResultStore(output_dir, _manifest("gsm8k", "chat" if chat else "base", args, model, **settings),
                            args.overwrite)
        done = store.load("gsm8k")
        todo = [index for index in range(len(problems)) if str(index) not in done]
        with running_engine(model, tokenizer, args.batch_size) as engine, \
                _progress(len(todo), "GSM8K chat" if chat else "GSM8K few-shot", "problem") as bar:
            room = _generation_room(engine, params.max_new_tokens)
            prompt_ids = []
            for index in todo:
                question = problems[index].question
                if chat:
                    # With --use-fewshot, the user turn is the base prompt: the exemplars, then the question.
                    query = prompts.gsm8k_base_prompt(exemplars, question).rstrip("\n") if few_shot else question
                    ids = _chat_prompt_ids(tokenizer, model, query)
                else:
                    ids = _encode(tokenizer, prompts.gsm8k_base_prompt(exemplars, question))
                prompt_ids.append(fit_prompt(ids, room)[0])

            def save(job: int, text: str, finish_reason: str) -> None:
                index = todo[job]
                completion = text.strip() if chat else truncate_at_stops(text, params.stop_strings)
                predicted = extract_math_answer(completion)
                record = {
                    "id": index, "answer": format_number(problems[index].answer),
                    "prediction": format_number(predicted),
                    "correct": numbers_match(predicted, problems[index].answer, tolerance),
                    "completion": completion,
                }
                store.append("gsm8k", record)
                _debug(args, tokenizer, prompt_ids[job], record)
                bar.update(1)

            generate(engine, prompt_ids, params, save)
        saved = store.load("gsm8k")
        summary = accuracy_summary({"gsm8k": [saved[str(i)] for i in range(len(problems)) if str(i) in saved]},
                                   "micro")
        _write_sample_file(args.sample_output_file, (
            {"question": problem.question, "answer": problem.solution, "completion": saved[str(i)]["completion"],
             "acc": saved[str(i)]["correct"]} for i, problem in enumerate(problems) if str(i) in saved))
        shots = (f"few-shot ({Path(args.prompt_file).name})" if args.prompt_file is not None else
                 f"{4 if chat else 8}-shot (the original's exemplars)")
        mode = (f"chat, {shots if few_shot else '0-shot'}, greedy" if chat else f"base, {shots}, greedy")
        results = {"benchmark": "GSM8K", "mode": mode, "checkpoint": _checkpoint_name(args.checkpoint_path),
                   **summary}
        _finish(output_dir, "GSM8K" + (", chat" if chat else "") + (" few-shot" if few_shot else " 0-shot"), results)
    return 0


# --------------------------------------------------------------------------------------------------------------------
# HumanEval
# --------------------------------------------------------------------------------------------------------------------


def humaneval_parser(chat: bool, description: str | None = None) -> argparse.ArgumentParser:
    parser = _parser(description, "chat_humaneval" if chat else "humaneval",
                     "folder holding HumanEval.jsonl or HumanEval.jsonl.gz (or the file itself)", generates=True,
                     chat=chat, data_aliases=FILE_DATA_ALIASES,
                     sample_file="the completions in the format of the human-eval harness")
    parser.add_argument("--timeout", type=_positive_float, default=5.0,
                        help="seconds each program may run (default 5)")
    parser.add_argument("--memory-mb", type=_positive_int, default=1024,
                        help="address space each program may use, MiB (default 1024)")
    parser.add_argument("--workers", type=_positive_int, default=os.cpu_count() or 1,
                        help="programs run at once (default: one per CPU)")
    parser.add_argument(UNSAFE_FLAG, action="store_true",
                        help="where bubblewrap cannot isolate the programs (not installed, or no user namespaces), "
                             "run them anyway with only resource limits and an in-process guard that model code can "
                             "undo: they can then reach your files, network and processes. results.json records it")
    if not chat:
        parser.add_argument("--stop", choices=sorted(COMPLETION_STOPS), default="qwen",
                            help="where a completion ends: 'qwen' (the published runs: at the first blank line or "
                                 "'def ') or 'codex' (the HumanEval paper's stop sequences)")
    return parser


def run_humaneval(chat: bool, argv: Sequence[str] | None = None, description: str | None = None) -> int:
    """HumanEval pass@1 with greedy decoding: each completion runs against the task's tests in the sandbox."""
    args = _parse(humaneval_parser(chat, description), argv)
    sandbox = Sandbox(timeout=args.timeout, memory_mb=args.memory_mb, allow_unisolated=args.allow_unsafe_execution)
    with _user_errors():
        tasks = read_humaneval(args.data_dir, args.limit)
        queries: dict[str, str] = {}  # the chat model's user turn of each task
        for task in tasks if chat else []:
            query = prompts.humaneval_chat_prompt(task.prompt, task.entry_point)
            if query is None:
                raise DataLayoutError(f"HumanEval task {task.task_id}: its prompt has no one-line 'def "
                                      f"{task.entry_point}(...):' or no docstring, which the chat prompt quotes.")
            queries[task.task_id] = query
        isolation = require_isolation(sandbox)  # before the model loads: a refusal costs a second, not a run
        if isolation.bwrap is None:
            print(f"WARNING: model-written programs will run WITHOUT isolation ({UNSAFE_FLAG}): "
                  f"{isolation.problem}. They can read and write your files, reach the network and signal your "
                  "processes; results.json records this.", file=sys.stderr)
        model, tokenizer = _load(args)
        params = _generation_params(model, tokenizer, args.max_new_tokens, chat, "evaluate_humaneval.py",
                                    () if chat else COMPLETION_STOPS[args.stop])
        settings: dict[str, Any] = {"max_new_tokens": params.max_new_tokens,
                                    "repetition_penalty": params.repetition_penalty}
        if not chat:
            settings["stop"] = args.stop
        output_dir = Path(args.output_dir)
        store = ResultStore(output_dir, _manifest("humaneval", "chat" if chat else "base", args, model, **settings),
                            args.overwrite)
        done = store.load("humaneval")
        todo = [task for task in tasks if task.task_id not in done]
        with running_engine(model, tokenizer, args.batch_size) as engine, \
                _progress(len(todo), "HumanEval chat" if chat else "HumanEval", "task") as bar:
            room = _generation_room(engine, params.max_new_tokens)
            prompt_ids = [
                fit_prompt(_chat_prompt_ids(tokenizer, model, queries[task.task_id])
                           if chat else _encode(tokenizer, task.prompt), room)[0]
                for task in todo
            ]

            def save(job: int, text: str, finish_reason: str) -> None:
                task = todo[job]
                record: dict[str, Any] = {"id": task.task_id}
                if chat:
                    record["response"] = text.strip()
                    record["completion"] = chat_code_completion(record["response"], task.entry_point)
                else:
                    record["completion"] = truncate_at_stops(text, params.stop_strings)
                store.append("humaneval", record)
                _debug(args, tokenizer, prompt_ids[job], record)
                bar.update(1)

            generate(engine, prompt_ids, params, save)
        saved = store.load("humaneval")
        # The completions in the official harness's input format, for a cross-check with `human-eval`.
        samples = output_dir / "samples.jsonl"
        samples.write_text("".join(
            json.dumps({"task_id": task.task_id, "completion": saved[task.task_id]["completion"]},
                                     ensure_ascii=False) + "\n" for task in tasks), encoding="utf-8")
        _write_sample_file(args.sample_output_file, (
            {"task_id": task.task_id, **{key: saved[task.task_id][key] for key in ("completion", "response")
                                         if key in saved[task.task_id]}} for task in tasks))
        programs = [humaneval_program(task.prompt, saved[task.task_id]["completion"], task.test, task.entry_point)
                    for task in tasks]
        with _progress(len(programs), "running tests", "program") as bar:
            outcomes = run_many(programs, sandbox, args.workers, on_done=lambda index, result: bar.update(1))
        executions = {task.task_id: {"status": outcome.status, "detail": outcome.detail}
                      for task, outcome in zip(tasks, outcomes, strict=True)}
        summary = accuracy_summary({"humaneval": [{"correct": e["status"] == "passed"} for e in executions.values()]},
                                   "micro")
        results = {"benchmark": "HumanEval", "mode": ("chat, 0-shot, greedy" if chat
                                                      else f"base, 0-shot, greedy, stop: {args.stop}"),
                   "checkpoint": _checkpoint_name(args.checkpoint_path), "pass@1": summary["overall"]["accuracy"],
                   **summary, "sandbox": describe(sandbox), "tasks": executions}
        _finish(output_dir, "HumanEval pass@1" + (", chat" if chat else ""), results)
        if isolation.bwrap is None:
            print(f"WARNING: these programs ran WITHOUT isolation ({UNSAFE_FLAG}).", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------------------------------
# Tool use
# --------------------------------------------------------------------------------------------------------------------

# The files of the original release's current tool-use table ("Version 20231206"); the older set is
# exam_plugin_v1_react_{positive,negative}.jsonl (see eval/EVALUATION.md).
POSITIVE_FILE = "exam_plugin_v20231206_react_positive.jsonl"
NEGATIVE_FILE = "exam_plugin_v20231206_react_negative.jsonl"


def tool_use_parser(description: str | None = None) -> argparse.ArgumentParser:
    # The original script read its files from eval/data.
    parser = _parser(description, "plugin", f"folder holding {POSITIVE_FILE} and {NEGATIVE_FILE}", generates=True,
                     chat=True, data_default=str(EVAL_DIR / "data"))
    parser.add_argument("--positive-file", "--eval-react-positive-filename", default=POSITIVE_FILE,
                        help=f"file of samples that need a tool, in the data folder (default {POSITIVE_FILE})")
    parser.add_argument("--negative-file", "--eval-react-negative-filename", default=NEGATIVE_FILE,
                        help=f"file of samples that need no tool, in the data folder (default {NEGATIVE_FILE})")
    parser.add_argument("--eval-react-positive", action="store_true",
                        help="evaluate the positive samples (without this and --eval-react-negative: both files)")
    parser.add_argument("--eval-react-negative", action="store_true",
                        help="evaluate the negative samples (without this and --eval-react-positive: both files)")
    parser.add_argument("--eval-hfagent", action="store_true",
                        help="the original script's transformers-agents benchmark: not available here")
    return parser


def run_tool_use(argv: Sequence[str] | None = None, description: str | None = None) -> int:
    """The ReAct tool-use evaluation: each prompt (tool list, ReAct instructions and question) is one user turn; the
    greedy reply, stopped at "Observation:", is read with the server's ReAct parser."""
    args = _parse(tool_use_parser(description), argv)
    if args.eval_hfagent:
        raise SystemExit("error: --eval-hfagent (the original script's Hugging Face agent benchmark) is not "
                         "available: transformers no longer has the transformers.tools agents it ran on. Drop the "
                         "flag to evaluate ReAct tool use.")
    chosen = [group for group, wanted in (("positive", args.eval_react_positive),
                                          ("negative", args.eval_react_negative)) if wanted]
    files = {"positive": args.positive_file, "negative": args.negative_file}
    with _user_errors():
        groups = {group: read_tool_use(args.data_dir, files[group], args.limit)
                  for group in chosen or ["positive", "negative"]}
        for number, sample in enumerate(groups.get("positive", []), start=1):
            if tool_call_of(sample.reference) is None:
                raise DataLayoutError(f"{args.positive_file}: sample {number}'s response calls no tool (no line "
                                      "starting with 'Action: '); every positive sample must.")
        model, tokenizer = _load(args)
        _require_chat_model(model, None)
        params = greedy_params(model.generation_config, args.max_new_tokens, chat_stop_token_ids(tokenizer),
                               REACT_STOP_WORDS)
        output_dir = Path(args.output_dir)
        manifest = _manifest("plugin", "chat", args, model, max_new_tokens=params.max_new_tokens,
                             repetition_penalty=params.repetition_penalty)
        store = ResultStore(output_dir, manifest, args.overwrite)

        def tokenize(text: str) -> list[str]:
            return rouge_tokens(tokenizer, text)

        jobs = [(group, index) for group, samples in groups.items()
                for index in range(len(samples)) if str(index) not in store.load(group)]
        with running_engine(model, tokenizer, args.batch_size) as engine, \
                _progress(len(jobs), "tool use", "sample") as bar:
            room = _generation_room(engine, params.max_new_tokens)
            prompt_ids = [fit_prompt(_chat_prompt_ids(tokenizer, model, groups[group][index].prompt), room)[0]
                          for group, index in jobs]

            def save(job: int, text: str, finish_reason: str) -> None:
                group, index = jobs[job]
                record: dict[str, Any] = {"id": index, "response": text}
                if group == "positive":
                    record.update(score_tool_call(text, groups[group][index].reference, tokenize))
                else:
                    called = tool_call_of(text)
                    record["tool"] = called[0] if called else None
                store.append(group, record)
                _debug(args, tokenizer, prompt_ids[job], record)
                bar.update(1)

            generate(engine, prompt_ids, params, save)
        saved = {group: store.load(group) for group in groups}
        records = {group: [saved[group][str(i)] for i in range(len(samples)) if str(i) in saved[group]]
                   for group, samples in groups.items()}
        scores = summarize_tool_use(records.get("positive", []), records.get("negative", []))
        results = {"benchmark": "ReAct tool use", "mode": "chat, greedy, stop at 'Observation:'",
                   "checkpoint": _checkpoint_name(args.checkpoint_path), **scores}
        write_json(output_dir / "results.json", results)
        print(_tool_table(scores))
        print(f"\nresults: {output_dir / 'results.json'}")
    return 0


def _tool_table(scores: Mapping[str, Any]) -> str:
    rows = [("tool selection accuracy %", "tool_selection_accuracy", "positive_samples"),
            ("action input ROUGE-L %", "action_input_rouge_l", "positive_samples"),
            ("false positive rate %", "false_positive_rate", "negative_samples")]
    lines = ["ReAct tool use", "=============="]
    for label, key, count in rows:
        if key in scores:
            lines.append(f"{label:<27} {scores[key]:>7.2f}   ({scores[count]} samples)")
    return "\n".join(lines)
