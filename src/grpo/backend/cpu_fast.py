"""The CPU fast path: the same log-probs and gradients as `grpo.backend.plain`, computed with less work.

- oneDNN matmuls, forward and backward, for every nn.Linear of the policy and the reference during a
  step (`grpo.backend.onednn.use_in`): under bfloat16 always; in float32 except on an Intel CPU, where
  PyTorch's default kernel (MKL) is the faster one (on the AMD CPUs measured it reached about half of
  oneDNN's rate at these shapes: benchmarks/RESULTS_train.md).
- A sparse input-embedding gradient (`sparse_embedding_grad`), made dense once before clipping.
- As the plain backend (grpo.backend.lean, shared): no [tokens x vocab] logits (the output head turns
  only the real completion tokens into logits, `chunk_tokens` at a time, with its own backward), and each
  group's prompt run once.

Each piece has an equivalence test against the plain path (tests/test_logprobs.py, test_onednn.py,
test_backend.py). The sparse embedding gradient swaps the embedding's weight for a second leaf, which
DDP and FSDP cannot see, so it runs in one process only: under a distributed wrapper the plain path runs.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch

from grpo.backend import onednn
from grpo.backend.plain import PlainBackend, completion_logprobs  # noqa: F401  (the shared lean path)


@contextmanager
def sparse_embedding_grad(model: torch.nn.Module):
    """Within this block (forward and backward) the input embedding's gradient is sparse: the rows of the
    tokens the batch holds, added into the weight's .grad on exit, instead of a dense [V, D] tensor per
    forward (for SmolLM2 a zero-filled 113 MB, then added).

    The lookup reads the weight through a second leaf on the same storage (no copy): with a tied
    output head, autograd would otherwise sum the head's dense gradient and the sparse one out of place,
    a fresh [V, D] copy per backward. Where .grad is still empty (an untied embedding) it stays sparse
    until `densify_grads`.
    """
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if type(emb) is not torch.nn.Embedding or not emb.weight.requires_grad or emb.sparse:
        yield
        return
    weight = emb.weight
    alias = torch.nn.Parameter(weight.detach())  # the same storage
    emb.weight, emb.sparse = alias, True
    try:
        yield
    finally:
        emb.weight, emb.sparse = weight, False
        if alias.grad is not None:
            if weight.grad is None:
                weight.grad = alias.grad
            else:
                weight.grad.add_(alias.grad)  # dense += sparse, in place


def densify_grads(params) -> None:
    """Replace sparse gradients (see `sparse_embedding_grad`) by dense ones, for clipping and the optimizer."""
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.to_dense()


class CpuFastBackend(PlainBackend):
    """The plain backend's contract with the CPU fast paths of this module (see its docstring)."""

    name = "cpu_fast"

    def step(self, *models):
        """oneDNN's matmuls for the models' Linear layers: always under bfloat16; in float32 where it is this CPU's
        faster kernel (`onednn.float32_training_kernel`)."""
        return onednn.use_in(*models, enabled=self.autocast or onednn.float32_training_kernel() == "onednn")

    def _grad_extras(self, stack: ExitStack, model) -> None:
        stack.enter_context(sparse_embedding_grad(model))

    def finish_grads(self, params) -> None:
        densify_grads(params)
