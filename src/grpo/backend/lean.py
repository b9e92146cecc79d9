"""Completion log-probs without the [rows, T, vocab] logits, each group's prompt run once: the path both
backends take (grpo.backend.plain, grpo.backend.cpu_fast) for a model whose logits are head(decoder(...)).

- The output head turns only the real completion tokens into logits, `chunk_tokens` at a time, the
  log-softmax and entropy in float32; under autograd each chunk is recomputed in the backward pass, which
  turns it straight into the logits' gradient (`_HeadLogprobs`, the idea of Liger's fused linear
  cross-entropy). At most one or two [chunk, V] blocks exist at once, instead of the [rows, T, V] logits,
  their log-softmax and its gradient.
- Each group's prompt runs once: the G completions of a group attend to one computation of its keys and
  values, gathered per row (`_shared_prompt_hidden`; verl calls it prefix grouping). For the families
  grpo.backend.packed knows, the prompts and the completions go through the decoder packed into one sequence
  (each weight in one matmul, forward and backward); for others, the prompts first and the completions on
  their KV cache.

Both happen inside the model's own forward, `model(...)` called on the module the caller holds (a DDP
wrapper, an FSDP2-sharded model, a peft model): for that one call the model's decoder and output head are
swapped for stand-ins (`_PromptOnce`, `_LogprobHead`) that do the above and hand back what the model's
forward expects (hidden states; a [n, T, 2] tensor of log-probs and entropies in the place of the logits).
So a distributed wrapper sees every forward: DDP's hooks on the top-level forward fire, and FSDP2 gathers
the root's parameters, the (possibly tied) head's weight among them, around it; the head's gradient is
reduced with the root's. The head itself still runs through its own module (hooks, oneDNN's patched
forward), one chunk at a time.

Where each piece does not apply, the caller gets the plain computation instead, never a wrong one:
- `lean_logprobs` returns None for a model whose logits are more than head(hidden) (softcapping, a logit
  scale: `LOGIT_TRANSFORMS`) or whose head is not an nn.Linear (e.g. a LoRA adapter on the head); the
  backend then runs the full-logits reference (grpo.backend.plain.completion_logprobs_reference).
- Each row runs its own prompt (the decoder's plain forward) under gradient checkpointing (a checkpointed
  layer drops the cache it is given, so the prompt's keys would be lost, and recomputes its attention after
  the packed one is gone), for a model with any attention layer other than full attention or a sliding window
  shorter than the rows (a sliding-window cache keeps only the window), where every prompt of the
  micro-batch is distinct and the model cannot be packed, and under FSDP2 where it cannot be packed (a
  sharded layer gathers its weights for the backward from hooks on its outputs, and through the cache the
  completions' gradient would reach the prompt's keys and values around those hooks; packed, each layer
  runs once, on every token).
"""

from __future__ import annotations

import inspect
from contextlib import ExitStack, contextmanager

import torch

from grpo.backend import onednn
from grpo.backend.packed import packable, packed_hidden
from grpo.core.logprobs import SequenceBatch, distinct_prompts

# Config fields of models whose logits are more than head(hidden): softcapping (Gemma 2/3),
# a logit scale (Cohere) or divisor (Granite). Those models take the plain path.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside `model`: through a DDP wrapper (.module) and a peft model (its LoRA
    layers sit inside the base model's modules). FSDP2 shards in place: the model itself."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder, output head) when the model's logits are exactly head(decoder(...).last_hidden_state);
    None for models that transform their logits further (they take the reference path)."""
    base = causal_lm(model)
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


def is_fsdp(model: torch.nn.Module) -> bool:
    """Whether FSDP2 (fully_shard) manages any module of `model`."""
    if not torch.distributed.is_available():  # a torch build without torch.distributed: nothing is sharded
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def _attends_all(decoder, width: int) -> bool:
    """Whether every layer of `decoder` attends over all of `width` positions: full attention, or a sliding window
    at least that long."""
    config = getattr(decoder, "config", None)
    layer_types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None) if not layer_types else None
    return all(kind == "full_attention" for kind in layer_types) and not (window and window < width)


def runs_packed(model: torch.nn.Module, width: int, checkpointing: bool = False) -> bool:
    """Whether `lean_logprobs` runs `model`'s rows of up to `width` tokens packed (grpo.backend.packed), in a pass
    with gradient checkpointing or without; the trainer then budgets a micro-batch by the tokens packing runs."""
    parts = decoder_and_head(model)
    return parts is not None and not checkpointing and packable(parts[0]) and _attends_all(parts[0], width)


def _shared_prompt_hidden(decoder, batch: SequenceBatch, device, through_cache: bool = True):
    """The decoder's output for the rows of `batch`, with each distinct prompt run once: the prompts' keys
    and values are computed for the distinct prompts, gathered per row (gradients flow back through the
    gather), and the completions attend to them. Its last_hidden_state is [n, T + 1, H], the positions
    P-1 .. P+T-1 (the last prompt token's, then the completion's). The G completions of a group share
    their prompt, so the forward (and backward) covers u * P + n * T tokens instead of n * (P + T): in one
    packed pass (grpo.backend.packed) where the model allows (also for distinct prompts: the completions' padding
    is left out), else the prompts with a KV cache, then the completions on it (not with `through_cache` False:
    under FSDP2; not for distinct prompts). None when neither applies (see the module docstring); the caller then
    runs the plain forward."""
    from transformers.cache_utils import DynamicLayer
    from transformers.modeling_outputs import BaseModelOutputWithPast

    if torch.is_grad_enabled() and any(getattr(m, "gradient_checkpointing", False) and m.training
                                       for m in decoder.modules()):
        return None  # a checkpointed layer drops the cache it is given: the prompt's keys would be lost
    if not _attends_all(decoder, batch.input_ids.shape[1]):
        return None  # a sliding window shorter than the rows: the prompt's keys would be cut
    width = batch.input_ids.shape[1] - batch.completion_len  # P
    if width == 0:
        return None
    p_ids, p_mask, rows = distinct_prompts(batch)  # [u, P] left-padded, [n]
    rows = rows.to(device)
    if packable(decoder):  # also where every prompt is distinct: the completions' padding is left out
        ids, positions, mask = (x[:, width:].to(device)
                                for x in (batch.input_ids, batch.position_ids, batch.attention_mask))
        hidden = packed_hidden(decoder, p_ids.to(device), p_mask.to(device), rows, ids, positions, mask.bool())
        if hidden is not None:
            return BaseModelOutputWithPast(last_hidden_state=hidden)
    if not through_cache or p_ids.shape[0] == rows.shape[0]:
        return None  # through the cache, distinct prompts would gain nothing
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
    cache.batch_select_indices(rows)  # [u, ...] -> [n, ...] keys and values, one prompt per row
    out = decoder(
        input_ids=batch.input_ids[:, width:].to(device),
        attention_mask=batch.attention_mask.to(device),  # [n, P + T]: the prompt's padding stays masked
        position_ids=batch.position_ids[:, width:].to(device),
        use_cache=True,
        **{cache_kwarg: cache},
    )
    last = prompt.last_hidden_state[:, -1][rows]  # [n, H]: predicts completion token 0 (prompts are left-padded)
    out.last_hidden_state = torch.cat([last[:, None], out.last_hidden_state], dim=1)  # [n, T + 1, H]
    return out


class _HeadLogprobs(torch.autograd.Function):
    """log p(target) and the entropy of softmax(head(hidden) / temperature), chunk_tokens rows at a time.

    Forward keeps no logits; backward recomputes each chunk's logits once and turns them straight into
    the logits' gradient, p * (-g) plus g at the target (and the entropy's -p * (log p + H) where its
    gradient is asked), so per chunk it holds one or two [chunk, V] blocks. The head weight's gradient
    of all chunks accumulates into one [V, H] buffer (an in-place matmul) instead of a fresh [V, H]
    tensor per chunk. The matmuls run through `head` itself (its patched forward when `grpo.onednn`
    is active) and `onednn.matmul_for`. The backward recomputes under the autocast state of the forward
    (on any device), so the recomputed logits are the forward's.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, head, targets, temperature, chunk, with_entropy, entropy_grad):
        # hidden [K, H], weight [V, H], targets [K] -> log-probs [K], entropy [K] (zeros unless asked)
        kind = hidden.device.type
        ctx.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
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
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy):  # [K], [K]
        kind, enabled, dtype = ctx.autocast
        with torch.autocast(kind, dtype=dtype, enabled=enabled):
            return _head_backward(ctx, grad_logp, grad_entropy)


def _head_backward(ctx, grad_logp, grad_entropy):
    """`_HeadLogprobs.backward`: the gradients of hidden [K, H], weight [V, H] and bias [V]."""
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    grad_h = torch.zeros_like(hidden) if need_h else None  # [K, H]
    # [V, H]: the first chunk's product is written into it, the others' added (zeros only if there is no chunk)
    grad_w = (torch.empty if hidden.shape[0] else torch.zeros)(weight.shape, dtype=torch.float32,
                                                                device=weight.device) if need_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
    # the backward's matmuls: in bfloat16 under a CPU bfloat16 autocast (oneDNN's op is not cast by autocast),
    # the weight's gradient summed in float32 from a small bfloat16 product buffer (`_add_product`)
    cast = ctx.bf16 or hidden.dtype
    w = (onednn.weight_in(ctx.head, cast) if ctx.head.weight is weight else weight.to(cast)) if need_h else None  # [V, H]
    product = torch.empty(min(PRODUCT_ROWS, weight.shape[0]), weight.shape[1], dtype=cast,
                          device=weight.device) if need_w and ctx.bf16 else None  # [rows, H]
    matmul = onednn.matmul_for(weight)
    g_lp = grad_logp.float()
    g_ent = grad_entropy.float() if ctx.entropy_grad and grad_entropy is not None else None
    rows = torch.arange(min(ctx.chunk, hidden.shape[0]), device=hidden.device)
    for start in range(0, hidden.shape[0], ctx.chunk):
        part = slice(start, start + ctx.chunk)
        h = hidden[part]  # [k, H]
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
        with torch.autocast(hidden.device.type, enabled=False):
            if need_w and product is not None:
                _add_product(grad_w, grad_z.t(), h.to(cast), product, overwrite=start == 0)
            elif need_w and start == 0:
                torch.mm(grad_z.t().to(grad_w.dtype), h.to(grad_w.dtype), out=grad_w)
            elif need_w:
                grad_w.addmm_(grad_z.t().to(grad_w.dtype), h.to(grad_w.dtype))  # in place: no [V, H] per chunk
        if need_b:
            grad_b += grad_z.sum(dim=0, dtype=torch.float32)
    grad_w = grad_w.to(weight.dtype) if need_w else None
    grad_b = grad_b.to(bias.dtype) if need_b else None
    return grad_h, grad_w, grad_b, None, None, None, None, None, None


PRODUCT_ROWS = 8192  # rows of the head weight's gradient made in bfloat16 at once (9 MB at H = 576)


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, buffer: torch.Tensor,
                 overwrite: bool = False) -> None:
    """out += a @ b (with `overwrite`, out = a @ b), the product made in a's dtype (bfloat16) `buffer.shape[0]`
    rows of out at a time, each slab added into (copied into) out, float32, while it is in cache. out [V, H]
    float32, a [V, k], b [k, H], buffer [r, H].

    In one piece, adding a [V, H] bfloat16 product into float32 makes a float32 copy of it first (PyTorch's
    CPU add_ casts a mixed-dtype operand out of place): 113 MB for a 49k vocabulary, freshly page-faulted
    whenever the heap could not hand back the last one's pages, up to ~0.2 s a chunk."""
    rows = buffer.shape[0]
    for start in range(0, out.shape[0], rows):
        n = min(rows, out.shape[0] - start)
        product = torch.mm(a[start:start + n], b, out=buffer[:n])
        out[start:start + n].copy_(product) if overwrite else out[start:start + n].add_(product)


def _chunk_logits(head: torch.nn.Linear, hidden: torch.Tensor, temperature: float) -> torch.Tensor:
    """[k, V] float32 logits of a chunk, divided by the sampling temperature."""
    logits = head(hidden).float()
    return logits.div_(temperature) if temperature != 1.0 else logits


def _scatter(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[n, T] float32 holding values [K] at the K True positions of mask, 0 elsewhere."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(mask, values)


class _LogprobHead(torch.nn.Module):
    """Stands in for the output head during one forward: takes the hidden states the model's forward hands
    its head ([n, >= T + 1, H], logits_to_keep = T + 1), returns [n, T, 2]: each completion token's float32
    log-prob and entropy (zeros unless asked), 0 at padding, from `_HeadLogprobs` through the real head."""

    def __init__(self, head: torch.nn.Linear, targets: torch.Tensor, mask: torch.Tensor, temperature: float,
                 chunk: int, with_entropy: bool, entropy_grad: bool):
        super().__init__()
        self.head = head  # a child, so the module tree (which FSDP2's first forward walks) stays whole
        self.targets, self.mask = targets, mask  # [n, T] long, [n, T] bool: the real completion tokens
        self.options = (temperature, chunk, with_entropy, entropy_grad)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        t = self.mask.shape[1]
        h = hidden[:, -t - 1 : -1][self.mask]  # [K, H]: position P-1+j predicts completion token j
        head = self.head  # its weight now: under FSDP2 the gathered one, inside the root's forward
        lp, ent = _HeadLogprobs.apply(h, head.weight, head.bias, head, self.targets[self.mask], *self.options)
        return torch.stack([_scatter(lp, self.mask), _scatter(ent, self.mask)], dim=-1)  # [n, T, 2]


class _PromptOnce(torch.nn.Module):
    """Stands in for the decoder during one forward: each distinct prompt of the rows runs once
    (`_shared_prompt_hidden`), where that applies; elsewhere the decoder's own forward."""

    def __init__(self, decoder: torch.nn.Module, completion_len: int, through_cache: bool = True):
        super().__init__()
        self.decoder, self.completion_len, self.through_cache = decoder, completion_len, through_cache

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        if input_ids is not None and attention_mask is not None and position_ids is not None:
            batch = SequenceBatch(input_ids, attention_mask, position_ids, self.completion_len)
            out = _shared_prompt_hidden(self.decoder, batch, input_ids.device, self.through_cache)
            if out is not None:
                return out
        return self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)


@contextmanager
def _standing_in(root: torch.nn.Module, module: torch.nn.Module, stand_in: torch.nn.Module):
    """Within this block `stand_in` takes `module`'s place in root's module tree (the attribute of its parent
    that holds it); the original is put back on exit."""
    parent, name = next((m, n) for m in root.modules() for n, child in m.named_children() if child is module)
    setattr(parent, name, stand_in)
    try:
        yield
    finally:
        setattr(parent, name, module)


def lean_logprobs(
    model: torch.nn.Module,
    batch: SequenceBatch,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    chunk_tokens: int = 256,
    share_prompts: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """[n, T] float32 log-probs of the completion tokens (0 at padding), and their entropy if asked, through
    `model`'s own forward without the [n, T, V] logits, chunk_tokens tokens at a time; with share_prompts,
    rows with the same prompt (a group) run it once. None where the model's logits are more than
    head(hidden): the caller takes the full-logits path. `model` may be a DDP wrapper, FSDP2-sharded, or
    a peft model (see the module docstring)."""
    parts = decoder_and_head(model)
    if parts is None:
        return None
    decoder, head = parts
    base = causal_lm(model)
    device = next(base.parameters()).device
    t = batch.completion_len
    mask = batch.attention_mask[:, -t:].to(device).bool()  # [n, T] real completion tokens
    targets = batch.input_ids[:, -t:].to(device)  # [n, T]
    stand_in = _LogprobHead(head, targets, mask, temperature, max(1, chunk_tokens), with_entropy, entropy_grad)
    with ExitStack() as stack:
        stack.enter_context(_standing_in(base, head, stand_in))
        if share_prompts:  # under FSDP2 packed only (see the module docstring)
            stack.enter_context(_standing_in(base, decoder, _PromptOnce(decoder, t, through_cache=not is_fsdp(base))))
        out = model(**batch.model_inputs(device), logits_to_keep=t + 1, use_cache=False).logits  # [n, T, 2]
    return out[..., 0], out[..., 1] if with_entropy else None
