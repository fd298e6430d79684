"""Training under PyTorch's own elastic launcher (issue 16 items 2, 3): torchrun
--max-restarts restarts a group whose worker was SIGKILLed mid-epoch and the run resumes by
itself from the newest checkpoint, ending bit-for-bit where an uninterrupted run ends; two
``torchrun --nnodes=2`` launchers (two "nodes" on 127.0.0.1, c10d rendezvous) train to the
single-process result.  CPU, gloo, a tiny model, the CLI as a user runs it."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from fastbert.train import checkpoint as ckpt_io
from test_train import ft
from test_train_ddp import _compare_params
from train_testing import DATA, REPO, SNLI, need, one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ["--data-dir", DATA, "--train-limit", "96", "--test-limit", "32", "--batch-size", "16",
        "--epochs", "2", "--num-hiddens", "32", "--ffn-num-hiddens", "64", "--num-heads", "2",
        "--num-layers", "1", "--max-len", "64", "--lr", "1e-3", "--backend", "reference",
        "--threads", "1", "--no-progress"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(launch, args, **env):
    e = {k: v for k, v in os.environ.items() if k != "FASTBERT_TEST_KILL_AT_STEP"}
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO, **env)
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "fastbert", "finetune",
           *ARGS, *args]
    # Its own session: a launcher that hangs is stopped with its workers (killpg).
    return subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(p, timeout=240):
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{out[-6000:]}")
    assert p.returncode == 0, out[-4000:]
    return out


def _result(out_dir):
    state = ckpt_io.load_checkpoint(str(out_dir))
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return state, json.load(f)


def test_elastic_restart_after_sigkill_finishes_like_an_uninterrupted_run(tmp_path):
    need(SNLI)
    launch = ["--standalone", "--nproc_per_node=2", "--max-restarts=1"]
    run = ["--dropout", "0.1", "--checkpoint-every", "2"]
    # 96 pairs / 16: 6 steps an epoch; rank 1 is SIGKILLed after step 9 (epoch 2, step 3),
    # the newest checkpoint is step 8's; the restarted group goes on from there.
    killed = _torchrun(launch, run + ["--out-dir", str(tmp_path / "killed")],
                       FASTBERT_TEST_KILL_AT_STEP="9:1")
    clean = _torchrun(launch, run + ["--out-dir", str(tmp_path / "clean")])
    out_killed, _ = _finish(killed), _finish(clean)
    assert "torchrun restart 1: resuming from the newest checkpoint" in out_killed, out_killed
    assert "resumed from" in out_killed and "checkpoint-000000008.pt" in out_killed
    a, log_a = _result(tmp_path / "killed")
    b, log_b = _result(tmp_path / "clean")
    assert a["global_step"] == b["global_step"] == 12
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "rss_mb")}  # noqa
                          for r in rows]
    assert strip(log_a["steps"]) == strip(log_b["steps"])
    assert log_a["epochs"] == log_b["epochs"]


def test_two_nodes_on_one_machine_match_one_process(tmp_path):
    need(SNLI)
    port = _free_port()
    launch = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
              f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=fastbert-test"]
    run = ["--dropout", "0.0", "--out-dir", str(tmp_path / "two")]
    nodes = [_torchrun(launch, run) for _ in range(2)]
    outs = [_finish(p) for p in nodes]
    assert any("examples/sec on 2 x cpu" in o for o in outs), outs
    state, log = _result(tmp_path / "two")
    one = ft(train_limit=96, test_limit=32, batch_size=16, epochs=2, lr=1e-3, dropout=0.0)
    assert len(log["steps"]) == len(one["steps"]) == 12
    for x, y in zip(log["steps"], one["steps"]):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["train_acc"] == y["train_acc"]
    assert log["epochs"][-1]["test_acc"] == one["test_acc"]
    _compare_params(state["model"], one["model"].state_dict())
