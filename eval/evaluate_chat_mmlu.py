"""MMLU, 0-shot, for chat models (e.g. Qwen-7B-Chat): each question is one chat turn; the letter is read from the
greedy reply (see eval/EVALUATION.md for the rules). Accuracy over all questions of data/test.

    python eval/evaluate_chat_mmlu.py -c Qwen/Qwen-7B-Chat -d data/mmlu/data"""

import sys

from evalkit.tasks import MMLU, run_choice_chat

if __name__ == "__main__":
    sys.exit(run_choice_chat(MMLU, description=__doc__))
