"""``embedding_sum`` on the triton backend is the reference's three ``F.embedding`` lookups:
on a GPU those gathers are memory-bound launches a Triton kernel would not beat by much, and
the op is a small share of a step.  Registered so that ``use_backend("triton")`` runs the
unpadded encoder without a fallback warning."""
from ..reference import embedding_sum

OPS = {"embedding_sum": embedding_sum}
