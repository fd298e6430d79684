"""Fine-tuning throughput (training examples/s, after warm-up steps) of the CLI's loop for
eager, torch.compile, bf16 autocast and 2-process DDP (torchrun, gloo), bert.small-shaped
model on real SNLI dev pairs.  Prints one JSON line per mode.

    python benchmarks/train_throughput.py [--backend auto] [--steps 20] [--threads 2]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(mode, a):
    out = tempfile.mkdtemp(prefix=f"fastbert_tp_{mode}_")
    args = ["finetune", "--train-limit", str(a.batch_size * (a.steps + a.warmup)),
            "--test-limit", "64", "--epochs", "1", "--batch-size", str(a.batch_size),
            "--backend", a.backend, "--no-progress", "--out-dir", out, "--quiet",
            "--max-len", str(a.max_len)]
    env = dict(os.environ, PYTHONPATH=REPO)
    if mode == "compile":
        args.append("--compile")
    if mode == "bf16":
        args += ["--amp", "bf16"]
    if mode == "ddp2":
        cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"),
               "--nproc_per_node=2", "-m", "fastbert", *args, "--threads",
               str(max(1, a.threads // 2))]
    else:
        cmd = [sys.executable, "-m", "fastbert", *args, "--threads", str(a.threads)]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        return {"mode": mode, "error": p.stderr[-2000:]}
    log = json.load(open(os.path.join(out, "metrics.json")))
    steps = log["steps"][a.warmup:]
    ex = sum(s["examples"] for s in steps)
    sec = sum(s["seconds"] for s in steps)
    return {"mode": mode, "backend": a.backend, "examples_per_sec": round(ex / sec, 1),
            "steps_timed": len(steps), "batch_size": a.batch_size,
            "test_acc": log["epochs"][-1]["test_acc"] if log["epochs"] else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="eager,compile,bf16,ddp2")
    a = ap.parse_args()
    for mode in a.modes.split(","):
        print(json.dumps(run(mode, a)), flush=True)


if __name__ == "__main__":
    main()
