"""Build time of the fine-tuning chapter's SNLIBERTDataset on real SNLI test: the book's
code (4-process Pool, transcribed in tests/d2l_book_code.py) vs fastbert's vectorized
build.  Same content (checked here too).  Usage:

    python benchmarks/data_prep_speed.py [--data-dir DIR] [--max-len 128]
"""
import argparse
import json
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, REPO)

import d2l_book_code as book  # noqa: E402
from fastbert.data import (SNLIBERTDataset, locate, read_snli_file,  # noqa: E402
                           snli_vocab)


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=None,
                    help="default: FASTBERT_DATA, the cache, the packaged splits")
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    files = locate("snli", ["test", "dev"], a.data_dir).files
    test = read_snli_file(files["test"])
    vocab = snli_vocab(read_snli_file(files["dev"]))
    t_book, ref = best_of(lambda: book.SNLIBERTDataset(test, a.max_len, vocab, processes=4),
                          a.repeat)
    t_book1, _ = best_of(lambda: book.SNLIBERTDataset(test, a.max_len, vocab, processes=None),
                         a.repeat)
    t_fast, mine = best_of(lambda: SNLIBERTDataset(test, a.max_len, vocab, verbose=False),
                           a.repeat)
    same = all(torch.equal(getattr(mine, n), getattr(ref, n))
               for n in ("all_token_ids", "all_segments", "valid_lens", "labels"))
    print(json.dumps({"examples": len(mine), "max_len": a.max_len, "cpus": os.cpu_count(),
                      "book_pool4_s": round(t_book, 4), "book_one_process_s": round(t_book1, 4),
                      "fastbert_s": round(t_fast, 4), "speedup_vs_pool": round(t_book / t_fast, 1),
                      "identical": same}))


if __name__ == "__main__":
    main()
