"""DDP on 2 CPU processes (gloo, torch.multiprocessing, the same code path torchrun takes)
against one process on the same global batches: same losses and parameters."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from fastbert.train import FinetuneConfig, PretrainConfig, finetune, pretrain
from op_testing import require
from train_testing import DATA, SNLI, TINY, WIKI, WIKI_SPLIT, need, one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

FT = dict(data_dir=DATA, max_len=64, progress=False, verbose=False, train_limit=96,
          test_limit=40, batch_size=32, epochs=1, dropout=0.0, lr=1e-3, backend="reference",
          **TINY)
PT = dict(data_dir=DATA, split=WIKI_SPLIT, max_paragraphs=60, batch_size=32, max_len=32, progress=False,
          verbose=False, max_steps=3, dropout=0.0, backend="reference", **TINY)

# W_k's bias cannot change the attention (softmax ignores a per-query constant), so its
# gradient is zero up to rounding, and Adam turns that rounding noise into steps of +-lr
# whose signs differ between any two summation orders.  It is compared separately.
NOISE_ONLY = "attention.W_k.bias"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, ports, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    os.environ["MASTER_PORT"] = str(ports[0])
    f = finetune(FinetuneConfig(**FT))
    os.environ["MASTER_PORT"] = str(ports[1])
    p = pretrain(PretrainConfig(**PT))
    # The real-slots MLM loss: ranks hold different numbers of real slots.
    os.environ["MASTER_PORT"] = str(ports[2])
    q = pretrain(PretrainConfig(**PT, mlm_loss="real-slots"))
    if rank == 0:
        torch.save({"ft_steps": f["steps"], "ft_acc": f["test_acc"],
                    "ft_params": f["model"].state_dict(), "pt_steps": p["steps"],
                    "pt_params": p["model"].state_dict(), "rs_steps": q["steps"],
                    "rs_params": q["model"].state_dict()}, out)


def _compare_params(a, b):
    for k in a:
        if k.endswith(NOISE_ONLY):
            assert (a[k] - b[k]).abs().max() <= 2.5 * 1e-3 * 3, k  # at most ~lr per step
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-6, msg=k)


def test_ddp_two_processes_match_one(tmp_path):
    need(SNLI), need(WIKI)
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, (_free_port(), _free_port(), _free_port()), out), nprocs=2,
             join=True)
    ddp = torch.load(out, weights_only=False)
    one_ft = finetune(FinetuneConfig(**FT))
    one_pt = pretrain(PretrainConfig(**PT))
    assert len(ddp["ft_steps"]) == len(one_ft["steps"]) == 3
    for x, y in zip(ddp["ft_steps"], one_ft["steps"]):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["train_acc"] == y["train_acc"]
    assert ddp["ft_acc"] == one_ft["test_acc"]
    _compare_params(ddp["ft_params"], one_ft["model"].state_dict())
    one_rs = pretrain(PretrainConfig(**PT, mlm_loss="real-slots"))
    for key, one in (("pt", one_pt), ("rs", one_rs)):
        assert len(ddp[key + "_steps"]) == 3
        for x, y in zip(ddp[key + "_steps"], one["steps"]):
            assert x["mlm_loss"] == pytest.approx(y["mlm_loss"], rel=1e-5)
            assert x["nsp_loss"] == pytest.approx(y["nsp_loss"], rel=1e-5)
        _compare_params(ddp[key + "_params"], one["model"].state_dict())


# The fast path: the cpp backend (unpadded varlen encoder, forward_rows skipping the last
# block's pad rows) under DDP, fp32 and bf16 autocast, eager and torch.compile (bf16
# compiled roughly doubles the test's time, 53 -> 110 s on the shared 2 cores: it is the
# issue's own case, so it stays).
FAST = [("off", False), ("bf16", False), ("off", True), ("bf16", True)]


def _fast(amp, compile_):
    # Compiled: one padded shape (--no-trim) and one eval batch, so one graph each (compiling
    # is what costs time on 2 shared cores).
    extra = dict(trim=False, test_limit=32) if compile_ else {}
    return dict(FT, backend="cpp", amp=amp, compile=compile_, **extra)


def _fast_worker(rank, world, ports, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    res = {}
    for (amp, compile_), port in zip(FAST, ports):
        os.environ["MASTER_PORT"] = str(port)
        f = finetune(FinetuneConfig(**_fast(amp, compile_)))
        res[amp, compile_] = (f["steps"], f["test_acc"], f["model"].state_dict())
    if rank == 0:
        torch.save(res, out)


def test_ddp_on_the_cpp_backend_fp32_bf16_compiled_match_one_process(tmp_path):
    need(SNLI)
    for op in ("varlen_attention", "add_layernorm", "ffn"):
        require("cpp", op, torch.device("cpu"), torch.float32)  # a required backend fails
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_fast_worker, args=(2, [_free_port() for _ in FAST], out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=False)
    for amp, compile_ in FAST:
        steps, acc, state = ddp[amp, compile_]
        one = finetune(FinetuneConfig(**_fast(amp, compile_)))
        assert len(steps) == len(one["steps"]) == 3
        bf16 = amp == "bf16"
        for x, y in zip(steps, one["steps"]):
            # bf16: each rank rounds its own shard's sums (other shapes, other order).
            assert x["loss"] == pytest.approx(y["loss"], rel=2e-2 if bf16 else 1e-5), amp
        ref = one["model"].state_dict()
        if bf16:
            for k in ref:
                if not k.endswith(NOISE_ONLY):
                    torch.testing.assert_close(state[k], ref[k], rtol=0.05, atol=3e-3, msg=k)
        else:
            assert acc == one["test_acc"]
            _compare_params(state, ref)
