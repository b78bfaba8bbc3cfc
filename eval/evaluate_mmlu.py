"""MMLU, 5-shot, for base models (e.g. Qwen-7B): the answer is the letter among " A" / " B" / " C" / " D" with
the highest next-token probability after the few-shot prompt. Accuracy over all questions of data/test.

    python eval/evaluate_mmlu.py -c Qwen/Qwen-7B -d data/mmlu/data"""

import sys

from evalkit.tasks import MMLU, run_choice_base

if __name__ == "__main__":
    sys.exit(run_choice_base(MMLU, description=__doc__))
