"""``linear`` on the triton backend is ``F.linear``: on a GPU that is cuBLAS, already the
fastest GEMM, and a Triton matmul would add nothing.  (The cpp backend has its own linear
kernel because on its CPUs oneDNN beats the MKL GEMM that F.linear uses.)  Registered so that
``use_backend("triton")`` runs the unpadded encoder's projections without a fallback warning."""
import torch.nn.functional as F

OPS = {"linear": F.linear}
