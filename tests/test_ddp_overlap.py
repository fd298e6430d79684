"""DDP over fastbert's fast path: the gradient all-reduce overlaps the backward (issue 16
item 4), and the classifier's ``forward_rows`` path (the last block runs for the <cls> row
only) leaves no parameter unused, so DDP's reducer needs no ``find_unused_parameters``.

One gloo process (world size 1) is enough for both: DDP's reducer buckets the gradients and
launches each bucket's all-reduce from the autograd hooks whatever the world size, and it
raises on the next step when a parameter got no gradient.  The two-process parity tests
(tests/test_train_ddp.py) check the values."""
import socket

import pytest
import torch
import torch.distributed as tdist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import fastbert
from fastbert import BERTClassifier, BERTModel
from op_testing import ran_on


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gloo_group():
    store = tdist.TCPStore("127.0.0.1", _free_port(), 1, is_master=True)
    tdist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        tdist.destroy_process_group()


def test_allreduce_overlaps_backward_on_cpp(gloo_group):
    torch.manual_seed(0)
    # Two blocks of hidden 128 / ffn 512 hold ~1.6 MB of weights above the embeddings, more
    # than DDP's first bucket (1 MB): the top of the network fills bucket 0, which is
    # reduced while the lower block and the embeddings are still in the backward.
    bert = BERTModel(vocab_size=3000, num_hiddens=128, norm_shape=[128], ffn_num_input=128,
                     ffn_num_hiddens=512, num_heads=2, num_layers=2, dropout=0.1, max_len=64,
                     key_size=128, query_size=128, value_size=128, hid_in_features=128,
                     mlm_in_features=128, nsp_in_features=128)
    net = BERTClassifier(bert)
    bert.encoder.pos_embedding.requires_grad_(False)  # the book never trains it (finetune.py)
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    events = []

    def recording_allreduce(state, bucket):
        events.append(("bucket", bucket.index()))
        return default_hooks.allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, recording_allreduce)
    # Fires when the backward has computed the token embedding's gradient: the last one.
    bert.encoder.token_embedding.weight.register_hook(
        lambda g: events.append(("embedding grad", None)))
    tokens = torch.randint(0, 3000, (8, 40))
    segments = torch.zeros_like(tokens)
    valid_lens = torch.tensor([40, 1, 17, 33, 2, 40, 9, 25])  # pad rows the last block skips
    labels = torch.randint(0, 3, (8,))
    with ran_on("cpp", torch.device("cpu"), torch.float32, ("varlen_attention", "ffn")):
        for _ in range(2):  # a parameter left without a gradient raises on the second step
            events.clear()
            loss = torch.nn.functional.cross_entropy(ddp((tokens, segments, valid_lens)), labels)
            loss.backward()
    buckets = [i for kind, i in events if kind == "bucket"]
    assert len(buckets) >= 2, f"one bucket only: nothing to overlap ({events})"
    first_reduce = events.index(("bucket", buckets[0]))
    assert first_reduce < events.index(("embedding grad", None)), (
        f"no all-reduce started before the backward reached the embeddings: {events}")
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
