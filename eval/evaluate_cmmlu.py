"""CMMLU, 5-shot, for base models: the letter with the highest next-token probability after "答案：". The score
is the mean of the subjects' accuracies on the test split.

    python eval/evaluate_cmmlu.py -c Qwen/Qwen-7B -d data/cmmlu"""

import sys

from evalkit.tasks import CMMLU, run_choice_base

if __name__ == "__main__":
    sys.exit(run_choice_base(CMMLU, description=__doc__))
