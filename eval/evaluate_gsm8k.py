"""GSM8K, 8-shot chain of thought, for base models: the original's eight exemplars (problems of GSM8K's train
split, rebuilt from train.jsonl), then the question; greedy decoding until the model starts another question; the
last number of the solution must equal the reference answer.

    python eval/evaluate_gsm8k.py -c Qwen/Qwen-7B -d data/gsm8k"""

import sys

from evalkit.tasks import run_gsm8k

if __name__ == "__main__":
    sys.exit(run_gsm8k(chat=False, description=__doc__))
