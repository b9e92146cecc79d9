"""The CPU fast path: the same log-probs and gradients as `grpo.backend.plain`, computed with less work.

- oneDNN matmuls, forward and backward, for every nn.Linear of the policy and the reference during a
  step (`grpo.backend.onednn.use_in`): PyTorch's default float32 kernel (MKL) reaches about half of
  oneDNN's rate at these shapes on the CPUs measured (benchmarks/RESULTS_train.md).
- No [tokens x vocab] logits: the decoder gives hidden states, and the output head turns only the
  real completion tokens into logits, `chunk_tokens` at a time; under autograd each chunk is recomputed
  in the backward pass, which turns it straight into the logits' gradient (`_HeadLogprobs`).
- Each group's prompt runs once: the G completions of a group attend to one computation of its keys
  and values, gathered per row (`_shared_prompt_hidden`).
- A sparse input-embedding gradient (`sparse_embedding_grad`), made dense once before clipping.

Each piece has an equivalence test against the plain path (tests/test_logprobs.py, test_onednn.py,
test_backend.py). It calls into the model's modules directly, so it runs in one process only: under a
distributed wrapper the plain path runs.
"""

from __future__ import annotations

import inspect
from contextlib import ExitStack, contextmanager

import torch

from grpo.backend import onednn
from grpo.backend.plain import PlainBackend, completion_logprobs_reference, zero_padding
from grpo.core.logprobs import SequenceBatch

# Config fields of models whose logits are more than head(hidden): softcapping (Gemma 2/3),
# a logit scale (Cohere) or divisor (Granite). Those models take the plain path.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder, output head) when the model's logits are exactly head(decoder(...).last_hidden_state);
    None for models that transform their logits further (they take the reference path). A peft model
    is looked through: its LoRA layers sit inside the base model's modules."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(c, k, None) not in (None, 1.0) for c in (config, text_config) for k in LOGIT_TRANSFORMS):
        return None
    get_decoder, get_head = getattr(base, "get_decoder", None), getattr(base, "get_output_embeddings", None)
    decoder = get_decoder() if get_decoder else None
    head = get_head() if get_head else None
    if decoder is None or decoder is base or not isinstance(head, torch.nn.Linear):
        return None
    return decoder, head


def _shared_prompt_hidden(decoder, batch: SequenceBatch, device) -> torch.Tensor | None:
    """[n, T, H] hidden states that predict the completion tokens, with each distinct prompt run once:
    the prompts' keys and values are computed for the distinct prompts, gathered per row (gradients
    flow back through the gather), and the completions attend to them. The G completions of a group
    share their prompt, so the forward (and backward) covers u * P + n * T tokens instead of
    n * (P + T). None when it does not apply (every prompt distinct, or a cache layer other than the
    plain full-attention one, e.g. a sliding window, or gradient checkpointing on); the caller then runs
    the plain forward."""
    from transformers.cache_utils import DynamicLayer

    if torch.is_grad_enabled() and any(getattr(m, "gradient_checkpointing", False) and m.training
                                       for m in decoder.modules()):
        return None  # a checkpointed layer drops the cache it is given: the prompt's keys would be lost
    config = getattr(decoder, "config", None)
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types) or (not layer_types and getattr(config, "sliding_window", None)):
        return None  # a sliding-window cache keeps only the window: the prompt's keys would be cut
    t = batch.completion_len
    width = batch.input_ids.shape[1] - t  # P
    key = torch.cat([batch.input_ids[:, :width], batch.attention_mask[:, :width]], dim=1)  # [n, 2P]
    distinct, inverse = torch.unique(key, dim=0, return_inverse=True)  # [u, 2P], [n]
    if distinct.shape[0] == key.shape[0] or width == 0:
        return None
    p_ids, p_mask = distinct[:, :width], distinct[:, width:]  # [u, P] left-padded
    cache_kwarg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    prompt = decoder(
        input_ids=p_ids.to(device),
        attention_mask=p_mask.to(device),
        position_ids=(p_mask.cumsum(dim=1) - 1).clamp(min=0).to(device),
        use_cache=True,
    )
    cache = getattr(prompt, "cache", None) or getattr(prompt, "past_key_values", None)
    if cache is None or not all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None])):
        return None
    rows = inverse.to(device)
    cache.batch_select_indices(rows)  # [u, ...] -> [n, ...] keys and values, one prompt per row
    completion = decoder(
        input_ids=batch.input_ids[:, width:].to(device),
        attention_mask=batch.attention_mask.to(device),  # [n, P + T]: the prompt's padding stays masked
        position_ids=batch.position_ids[:, width:].to(device),
        use_cache=True,
        **{cache_kwarg: cache},
    ).last_hidden_state  # [n, T, H]
    last = prompt.last_hidden_state[:, -1][rows]  # [n, H]: predicts completion token 0 (prompts are left-padded)
    return torch.cat([last[:, None], completion[:, :-1]], dim=1)  # [n, T, H]


class _HeadLogprobs(torch.autograd.Function):
    """log p(target) and the entropy of softmax(head(hidden) / temperature), chunk_tokens rows at a time.

    Forward keeps no logits; backward recomputes each chunk's logits once and turns them straight into
    the logits' gradient, p * (-g) plus g at the target (and the entropy's -p * (log p + H) where its
    gradient is asked), so per chunk it holds one or two [chunk, V] blocks. The head weight's gradient
    of all chunks accumulates into one [V, H] buffer (an in-place matmul) instead of a fresh [V, H]
    tensor per chunk. The matmuls run through `head` itself (its patched forward when `grpo.onednn`
    is active) and `onednn.matmul_for`; under a CPU bfloat16 autocast all three in bfloat16 (the backward
    recomputes the logits as the forward did), the log-softmax and the gradient sums in float32.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, weight, bias, head, targets, temperature, chunk, with_entropy, entropy_grad):
        # hidden [K, H], weight [V, H], targets [K] -> log-probs [K], entropy [K] (zeros unless asked)
        k = hidden.shape[0]
        token_logp = torch.zeros(k, dtype=torch.float32, device=hidden.device)
        entropy, lse = torch.zeros_like(token_logp), torch.zeros_like(token_logp)
        for start in range(0, k, chunk):
            part = slice(start, start + chunk)
            z = _chunk_logits(head, hidden[part], temperature)  # [k, V] float32
            lse[part] = torch.logsumexp(z, dim=-1)
            token_logp[part] = z.gather(1, targets[part, None]).squeeze(1) - lse[part]
            if with_entropy:
                logp = z.sub_(lse[part, None])  # in place: [k, V] log-probs
                entropy[part] = -(logp.exp().mul_(logp)).sum(dim=-1)
        ctx.head, ctx.temperature, ctx.chunk, ctx.entropy_grad = head, temperature, chunk, with_entropy and entropy_grad
        ctx.bf16 = onednn.autocast_dtype(weight)  # bfloat16 under a CPU bfloat16 autocast, else None
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        if not ctx.entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return token_logp, entropy

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy):  # [K], [K]
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None  # [K, H]
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None  # [V, H]
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        cast = ctx.bf16 or hidden.dtype  # the dtype of the backward's matmuls
        w = weight.to(cast) if need_h else None  # [V, H]
        product = torch.empty(weight.shape, dtype=cast, device=weight.device) if need_w and ctx.bf16 else None
        matmul = onednn.matmul_for(weight)
        g_lp = grad_logp.float()
        g_ent = grad_entropy.float() if ctx.entropy_grad and grad_entropy is not None else None
        rows = torch.arange(min(ctx.chunk, hidden.shape[0]), device=hidden.device)
        for start in range(0, hidden.shape[0], ctx.chunk):
            part = slice(start, start + ctx.chunk)
            h = hidden[part]  # [k, H]
            with torch.autocast("cpu", torch.bfloat16, enabled=ctx.bf16 is not None):  # as in the forward
                logp = _chunk_logits(ctx.head, h, ctx.temperature).sub_(lse[part, None])  # [k, V]
            p = logp.exp()
            g = g_lp[part, None]  # [k, 1]
            if g_ent is not None:  # dH/dz = -p (log p + H)
                grad_z = logp.add_(entropy[part, None]).mul_(-g_ent[part, None]).sub_(g).mul_(p)
            else:
                grad_z = p.mul_(-g)
            k = h.shape[0]
            grad_z[rows[:k], targets[part]] += g_lp[part]  # d log p(t) / dz = onehot(t) - p
            if ctx.temperature != 1.0:
                grad_z.div_(ctx.temperature)
            grad_z = grad_z.to(cast)
            if need_h:
                grad_h[part] = matmul(grad_z, w.t(), None)  # [k, V] x [V, H]
            if need_w and product is not None:  # bfloat16 product into one buffer, summed in float32
                grad_w.add_(torch.mm(grad_z.t(), h.to(cast), out=product))
            elif need_w:
                with torch.autocast(grad_w.device.type, enabled=False):
                    grad_w.addmm_(grad_z.t().to(grad_w.dtype), h.to(grad_w.dtype))  # in place: no [V, H] per chunk
            if need_b:
                grad_b += grad_z.sum(dim=0, dtype=torch.float32)
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def _chunk_logits(head: torch.nn.Linear, hidden: torch.Tensor, temperature: float) -> torch.Tensor:
    """[k, V] float32 logits of a chunk, divided by the sampling temperature."""
    logits = head(hidden).float()
    return logits.div_(temperature) if temperature != 1.0 else logits


def completion_logprobs(
    model: torch.nn.Module,
    batch: SequenceBatch,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    chunk_tokens: int = 256,
    share_prompts: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[n, T] log-probs of the completion tokens (0 at padding), and their entropy if asked, computed
    chunk_tokens tokens at a time without the [n, T, V] logits (see the module docstring). With
    share_prompts, rows with the same prompt (a group) run that prompt through the model once."""
    parts = decoder_and_head(model)
    if parts is None:  # logits that are more than head(hidden): the plain path, zeroed at padding too
        return zero_padding(*completion_logprobs_reference(model, batch, temperature, with_entropy, entropy_grad),
                            batch)
    decoder, head = parts
    device = head.weight.device
    t = batch.completion_len
    hidden = _shared_prompt_hidden(decoder, batch, device) if share_prompts else None
    if hidden is None:
        hidden = decoder(**batch.model_inputs(device), use_cache=False).last_hidden_state[:, -t - 1 : -1]
        # [n, T, H]: position P-1+j predicts completion token j
    mask = batch.attention_mask[:, -t:].to(device).bool()  # [n, T] real completion tokens
    hidden, targets = hidden[mask], batch.input_ids[:, -t:].to(device)[mask]  # [K, H], [K]
    token_logp, entropy = _HeadLogprobs.apply(hidden, head.weight, head.bias, head, targets, temperature,
                                              max(1, chunk_tokens), with_entropy, entropy_grad)  # [K], [K]
    return _scatter(token_logp, mask), _scatter(entropy, mask) if with_entropy else None


def _scatter(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[n, T] float32 holding values [K] at the K True positions of mask, 0 elsewhere."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(mask, values)


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

    def __init__(self, device: torch.device, precision: str = "float32", chunk_tokens: int = 256):
        super().__init__(device, precision, chunk_tokens)
        self.chunk_tokens = max(1, chunk_tokens)

    def step(self, *models):
        return onednn.use_in(*models)

    def logprobs(self, model, batch: SequenceBatch, temperature: float, with_entropy: bool = False,
                 entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        with self.precision_scope():
            return completion_logprobs(model, batch, temperature, with_entropy, entropy_grad, self.chunk_tokens)

    def _grad_extras(self, stack: ExitStack, model) -> None:
        stack.enter_context(sparse_embedding_grad(model))

    def finish_grads(self, params) -> None:
        densify_grads(params)
