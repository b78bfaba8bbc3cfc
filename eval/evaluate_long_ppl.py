"""Perplexity at long context lengths (1K to 32K tokens) with the context-extension options of the original README's
long-context table: plain, + dynamic NTK, + logn attention scaling, + window attention. Writes results.json,
results.md (the table) and ppl_vs_length.png (one line per option). The method is described in
eval/evalkit/long_context.py; the published table used arXiv papers.

    python eval/evaluate_long_ppl.py -c Qwen/Qwen-7B -d data/arxiv --lengths 1024 2048 4096 8192 16384 32768"""

import sys

from evalkit.long_context import run_long_ppl

if __name__ == "__main__":
    sys.exit(run_long_ppl(description=__doc__))
