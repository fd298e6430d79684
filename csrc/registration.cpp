// The one schema file of the fastbert extension: every op of the `fastbert` namespace is
// declared here (TORCH_LIBRARY may appear once per namespace); each op's kernels live in
// csrc/cpu/<op>.cpp (TORCH_LIBRARY_IMPL(fastbert, CPU)) and csrc/cuda/<op>_binding.cpp
// (TORCH_LIBRARY_IMPL(fastbert, CUDA)).  Fake kernels and autograd are registered in Python
// (fastbert/backends/cpp/<op>.py).  Keep one block per op, in the order of DESIGN.md.
#include <Python.h>
#include <torch/library.h>

// `import fastbert._C` loads this library, which runs the registrations below.  No pybind:
// every entry point is a dispatcher op reached through torch.ops.fastbert.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastbert's C++ ops (torch.ops.fastbert)",
                               -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(fastbert, m) {
  // masked_softmax: softmax over the last axis of X[N, Lq, Lk]; valid_lens None, [N] or
  // [N, Lq] int32.  The backward needs valid_lens too: a valid length of 0 gives a uniform
  // row whose gradient is 0 (the reference's masked_fill cuts it).
  m.def("masked_softmax(Tensor X, Tensor? valid_lens) -> Tensor");
  m.def("masked_softmax_backward(Tensor grad_out, Tensor out, Tensor? valid_lens) -> Tensor");

  // add_layernorm: layer_norm(dropout(y) + x) over the last axis.  mean and rstd (per row,
  // fp32; fp64 for fp64 input) are all the backward keeps; it regenerates the dropout mask
  // from seed (a 0-d int64 CPU tensor, None when dropout_p == 0).  With dropout_p == 0 the
  // backward returns grad_y as an empty (0,) tensor: it equals grad_x, which the caller reuses.
  m.def("add_layernorm(Tensor x, Tensor y, Tensor? weight, Tensor? bias, float eps, "
        "float dropout_p, Tensor? seed) -> (Tensor out, Tensor mean, Tensor rstd)");
  m.def("add_layernorm_backward(Tensor grad_out, Tensor x, Tensor y, Tensor? weight, "
        "Tensor mean, Tensor rstd, float dropout_p, Tensor? seed) "
        "-> (Tensor grad_x, Tensor grad_y, Tensor grad_weight, Tensor grad_bias)");
  // The keep mask (bool, CPU) a fused kernel draws for this seed: element i of the op's
  // output is kept iff uniform01(seed, i) >= p (csrc/common/counter_rng.h).  For tests.
  m.def("dropout_mask(Tensor seed, SymInt[] shape, float p) -> Tensor");

  // gather_positions: X[B, L, C], positions[B, P] int64 -> [B, P, C]; the backward
  // scatter-adds into [B, L, C] (positions may repeat), deterministically.
  m.def("gather_positions(Tensor X, Tensor positions) -> Tensor");
  m.def("gather_positions_backward(Tensor grad_out, Tensor positions, SymInt L) -> Tensor");

  // pack / unpack: X[B, L, ...] + valid_lens[B] int32 -> packed[T, ...], cu_seqlens[B+1]
  // int32 (T is data-dependent); unpack(packed, cu_seqlens, L) -> [B, L, ...], zeros at
  // pads.  pack_rows is pack with known offsets and T (unpack's backward).
  m.def("pack(Tensor X, Tensor valid_lens) -> (Tensor packed, Tensor cu_seqlens)");
  m.def("unpack(Tensor packed, Tensor cu_seqlens, SymInt L) -> Tensor");
  m.def("pack_rows(Tensor X, Tensor cu_seqlens, SymInt T) -> Tensor");

  // embedding_sum: ids[T, 3] int64 (token, segment, position) -> token_weight[ids[:, 0]] +
  // segment_weight[ids[:, 1]] + position_weight[ids[:, 2]] ([T, C], the tables' dtype).  The
  // backward returns the dense gradient of each table whose `needs` flag is set (else an
  // empty (0,) tensor).
  m.def("embedding_sum(Tensor ids, Tensor token_weight, Tensor segment_weight, "
        "Tensor position_weight) -> Tensor");
  m.def("embedding_sum_backward(Tensor grad, Tensor ids, SymInt V, SymInt S, SymInt P, "
        "bool[3] needs) -> (Tensor, Tensor, Tensor)");

  // mlm_loss: the MLM head (gather, Linear-ReLU-LayerNorm, Linear to the vocab) and its
  // cross-entropy on the real slots (weight > 0) only, vocab in chunks of `chunk` columns
  // (online logsumexp; the [slots, V] logits never exist).  positions, labels [B, P] int64;
  // weights [B, P] fp32 (fp64 for fp64).  loss = sum w_i CE_i / sum w_i (0 if no real slot),
  // lse[B, P] the per-slot logsumexp (0 at pads), both fp32 (fp64 for fp64 input).
  m.def("mlm_loss(Tensor X, Tensor positions, Tensor weights, Tensor labels, Tensor w1, "
        "Tensor b1, Tensor ln_weight, Tensor ln_bias, Tensor w2, Tensor b2, float eps, "
        "int chunk) -> (Tensor loss, Tensor lse)");
  m.def("mlm_loss_backward(Tensor grad_loss, Tensor? grad_lse, Tensor X, Tensor positions, "
        "Tensor weights, Tensor labels, Tensor w1, Tensor b1, Tensor ln_weight, "
        "Tensor ln_bias, Tensor w2, Tensor b2, float eps, int chunk, Tensor lse) -> "
        "(Tensor grad_X, Tensor grad_w1, Tensor grad_b1, Tensor grad_ln_weight, "
        "Tensor grad_ln_bias, Tensor grad_w2, Tensor grad_b2)");
  // mlm_loss_fwd_bwd: the loss and its gradients for d loss = 1 in one sweep (cpp: 3 GEMM
  // passes over the vocab instead of 4); autograd scales the grads by d loss.
  m.def("mlm_loss_fwd_bwd(Tensor X, Tensor positions, Tensor weights, Tensor labels, "
        "Tensor w1, Tensor b1, Tensor ln_weight, Tensor ln_bias, Tensor w2, Tensor b2, "
        "float eps, int chunk) -> (Tensor loss, Tensor grad_X, Tensor grad_w1, "
        "Tensor grad_b1, Tensor grad_ln_weight, Tensor grad_ln_bias, Tensor grad_w2, "
        "Tensor grad_b2)");

  // attention (padded): q[N, Lq, D], k[N, Lk, D], v[N, Lk, Dv], valid_lens None, [N] or
  // [N, Lq] int32 (0 -> uniform row); dropout on the probabilities from seed (element
  // (n, i, j) has counter (n * Lq + i) * Lk + j).  lse [N, Lq] fp32 is the per-row logsumexp
  // (the backward recomputes each row's softmax from q, k; csrc/cpu/attention.cpp).
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? valid_lens, float dropout_p, "
        "float scale, Tensor? seed) -> (Tensor out, Tensor lse)");
  m.def("attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, Tensor? valid_lens, float dropout_p, float scale, Tensor? seed) "
        "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");

  // varlen_attention: attention within each packed sequence; k, v[Tk, H, D] with
  // cu_seqlens[B+1] int32 offsets, q[Tq, H, D] with cu_seqlens_q[B+1] (None: q shares k's
  // rows, Tq == Tk); lse [Tq, H] fp32.  A sequence with queries but no keys outputs zeros.
  // The score element (query row tq, head h, key row u) has dropout counter
  // (tq * H + h) * Tk + u (csrc/cpu/varlen_attention.cpp).
  m.def("varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, float dropout_p, "
        "float scale, Tensor? seed, Tensor? cu_seqlens_q=None) -> (Tensor out, Tensor lse)");
  m.def("varlen_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
        "Tensor out, Tensor lse, Tensor cu_seqlens, float dropout_p, float scale, "
        "Tensor? seed, Tensor? cu_seqlens_q=None) "
        "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");

  // ffn: dense2(act(dense1(x))), nn.Linear layouts w1[F, C], w2[C2, F], activation "relu"
  // or "gelu" (erf).  saved [M, F] is what the backward needs: the post-activation for
  // relu, the pre-activation for gelu (csrc/cpu/ffn.cpp).  The backward returns all five
  // gradients (bias gradients even for a None bias; the caller drops them).
  m.def("ffn(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str activation) "
        "-> (Tensor y, Tensor saved)");
  m.def("ffn_backward(Tensor grad_y, Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, "
        "Tensor saved, str activation) -> (Tensor grad_x, Tensor grad_w1, Tensor grad_b1, "
        "Tensor grad_w2, Tensor grad_b2)");

  // linear: x[..., K] @ w[N, K]^T + b[N] (nn.Linear) on oneDNN (csrc/cpu/linear.cpp).  The
  // backward returns the bias gradient even for a None bias (the caller drops it).
  m.def("linear(Tensor x, Tensor w, Tensor? b) -> Tensor");
  m.def("linear_backward(Tensor grad_y, Tensor x, Tensor w, Tensor? b) "
        "-> (Tensor grad_x, Tensor grad_w, Tensor grad_b)");

#ifdef FASTBERT_CUDA
  // Present only in a build with the CUDA kernels: fastbert/backends/cpp/__init__.py asks
  // torch.ops.fastbert._cuda_built to decide whether the cpp backend serves CUDA tensors.
  m.def("_cuda_built() -> bool", []() { return true; });
#endif
}
