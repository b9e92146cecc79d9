"""The device-independent path: log-probs from the model's own forward, gradients as autograd makes them.

This is what runs on CUDA and under a distributed wrapper (DDP / FSDP2 hook the model's forward and
its parameters' gradients, so nothing may go around them), and on CPU when `trainer.backend: plain`.
It is as frugal as the CPU one where the model allows (grpo.backend.lean, run inside the model's own
forward): no [rows, T, vocab] logits (the output head turned into log-probs `chunk_tokens` tokens at a
time, with its own backward), and each group's prompt run once. `completion_logprobs_reference`, the
full-logits version, is what every fast piece is tested against, and what runs for a model whose logits
are more than head(hidden).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext

import torch

from grpo.backend.lean import lean_logprobs, runs_packed
from grpo.backend.sdpa import wrapping_sdpa
from grpo.core.logprobs import SequenceBatch, logprobs_from_logits
from grpo.models import checkpointed_layers, lora_dropout


def completion_logprobs_reference(
    model: torch.nn.Module,
    batch: SequenceBatch,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[n, T] log-probs of the completion tokens from the model's full logits of the completion positions
    (divided by the sampling temperature, as TRL). The plain version of `completion_logprobs`."""
    device = next(model.parameters()).device
    t = batch.completion_len
    out = model(**batch.model_inputs(device), logits_to_keep=t + 1, use_cache=False)
    logits = out.logits[:, :-1, :]  # [n, T, V]: position P-1+j predicts completion token j
    if temperature != 1.0:
        logits = logits / temperature
    targets = batch.input_ids[:, -t:].to(device)
    return logprobs_from_logits(logits, targets, with_entropy, entropy_grad)


def zero_padding(lp: torch.Tensor, ent: torch.Tensor | None, batch: SequenceBatch):
    """float32 log-probs (and entropy) that are 0 at the completion's padding."""
    real = batch.attention_mask[:, -batch.completion_len :].bool().to(lp.device)
    return lp.float() * real, ent.float() * real if ent is not None else None


def completion_logprobs(
    model: torch.nn.Module,
    batch: SequenceBatch,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    chunk_tokens: int = 256,
    share_prompts: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[n, T] float32 log-probs of the completion tokens (0 at padding), and their entropy if asked: the
    lean path (grpo.backend.lean: chunk_tokens tokens of logits at a time; with share_prompts each group's
    prompt once), or the full-logits reference for a model whose logits are more than head(hidden)."""
    lean = lean_logprobs(model, batch, temperature, with_entropy, entropy_grad, chunk_tokens, share_prompts)
    if lean is not None:
        return lean
    return zero_padding(*completion_logprobs_reference(model, batch, temperature, with_entropy, entropy_grad), batch)


@contextmanager
def float32_attention():
    """Within this block, transformers' `sdpa` attention computes in float32 inside an autocast (its operands cast
    up, autocast off around it; what autocast would do, minus rounding q, k and v): for a CPU bfloat16 autocast,
    where PyTorch's bfloat16 attention is slower than its float32 one, forward and backward, at these shapes
    (benchmarks/RESULTS_train.md). The matmuls around it stay bfloat16. Outside an autocast (another thread,
    a float32 step) the attention is untouched. The model's own `sdpa` entry (a user's, if any) is what runs."""
    with wrapping_sdpa(_attention_float32):
        yield


def _attention_float32(inner, module, query, key, value, attention_mask, *args, **kwargs):
    """`inner(...)` (transformers' attention signature) in float32 with autocast off, when called inside one."""
    kind = query.device.type
    if not torch.is_autocast_enabled(kind):
        return inner(module, query, key, value, attention_mask, *args, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()  # an additive mask: SDPA wants the query's dtype
    with torch.autocast(kind, enabled=False):
        return inner(module, query.float(), key.float(), value.float(), attention_mask, *args, **kwargs)


class PlainBackend:
    """Log-probs through `model(...)` (`completion_logprobs`): the output head turned into float32 log-probs
    `chunk_tokens` completion tokens at a time, each group's prompt run once where the model allows. With
    precision bfloat16 the log-prob passes run under bfloat16 autocast, on a CPU with the attention in float32
    (weights and optimizer stay in their dtype; grpo.backend.resolve_precision checks the device first)."""

    name = "plain"

    def __init__(self, device: torch.device, precision: str = "float32", chunk_tokens: int = 256):
        self.device = torch.device(device)
        self.autocast = precision == "bfloat16"
        self.attention_in_float32 = self.autocast and self.device.type == "cpu"  # see `float32_attention`
        self.chunk_tokens = max(1, chunk_tokens)

    @property
    def reduced_precision(self) -> bool:
        """Whether the log-prob passes run in lower precision than the weights (bf16 autocast): a sampler's
        log-probs in the weights' dtype are then not the trainer's pi_old."""
        return self.autocast

    @contextmanager
    def precision_scope(self):
        """Around a log-prob pass (and the forward of the policy's backward): bfloat16 autocast if asked, with
        the attention in float32 on a CPU (`float32_attention`)."""
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast), self.attention_scope():
            yield

    def attention_scope(self):
        """Attention in float32 under a CPU bfloat16 autocast (`float32_attention`), else nothing."""
        return float32_attention() if self.attention_in_float32 else nullcontext()

    def step(self, *models):
        """The scope of one training step (sampling, log-prob passes and updates) over these models."""
        return nullcontext()

    def logprobs(self, model, batch: SequenceBatch, temperature: float, with_entropy: bool = False,
                 entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[n, T] float32 log-probs of the completion tokens (0 at padding), and their entropy if asked."""
        with self.precision_scope():
            return completion_logprobs(model, batch, temperature, with_entropy, entropy_grad, self.chunk_tokens)

    def runs_packed(self, model, width: int, checkpointing: bool = False) -> bool:
        """Whether the log-prob passes of `model` over rows of up to `width` tokens run packed, each distinct prompt
        once and no completion padding (grpo.backend.lean.runs_packed); with `checkpointing`, a training pass
        under gradient checkpointing."""
        return runs_packed(model, width, checkpointing)

    @contextmanager
    def grad_scope(self, model, checkpointing: bool = False):
        """Around the policy's training forward and backward: gradient checkpointing if asked, LoRA dropout, and
        the precision's attention (a checkpointed layer recomputes its forward in the backward pass)."""
        with ExitStack() as stack:
            stack.enter_context(checkpointed_layers(model, checkpointing))
            stack.enter_context(self.attention_scope())
            stack.enter_context(lora_dropout(model))
            self._grad_extras(stack, model)
            yield

    def _grad_extras(self, stack: ExitStack, model) -> None:
        pass

    def finish_grads(self, params) -> None:
        """Make the accumulated gradients what clipping and the optimizer expect."""
