"""Per-token log-probabilities of completions under a model, and the micro-batches they are computed in.

`completion_logprobs` never holds the [n, T, V] logits: the decoder gives hidden states, and the
output head turns only the real completion tokens into logits, a chunk of tokens at a time; under
autograd each chunk is recomputed in the backward pass (activation checkpointing), so forward and
backward hold at most one [chunk, V] block. One pass gives the log-prob of each token and the
entropy of its distribution. `completion_logprobs_reference` is the plain version (full logits of
the completion positions) for models whose logits are not just head(hidden) and for the tests.

The G completions of a group share their prompt: the prompt runs once and the completions attend
to its keys and values (`_shared_prompt_hidden`).

`plan_micro_batches` groups completions of similar length under a token budget, and each
micro-batch is cut to its own widest prompt and longest completion, so padding costs little.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from grpo import onednn

# Config fields of models whose logits are more than head(hidden): softcapping (Gemma 2/3),
# a logit scale (Cohere) or divisor (Granite). Those models take the reference path.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass
class SequenceBatch:
    """Prompt (left-padded) followed by completion (right-padded), one row per completion."""

    input_ids: torch.Tensor  # [N, P + T]
    attention_mask: torch.Tensor  # [N, P + T] long
    position_ids: torch.Tensor  # [N, P + T] long, counted from each row's first real token
    completion_len: int  # T

    def model_inputs(self, device) -> dict[str, torch.Tensor]:
        """The whole rows as keyword arguments of a model's forward, on `device`."""
        return {"input_ids": self.input_ids.to(device), "attention_mask": self.attention_mask.to(device),
                "position_ids": self.position_ids.to(device)}


def left_pad(prompt_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, P] ids and attention mask (long), prompts aligned to the right."""
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def build_sequences(
    prompt_ids: list[list[int]],  # B prompts
    completion_ids: torch.Tensor,  # [N, T], N = B * G
    completion_mask: torch.Tensor,  # [N, T] bool
    pad_id: int,
) -> SequenceBatch:
    n, t = completion_ids.shape
    group_size = n // len(prompt_ids)
    prompts, pmask = left_pad(prompt_ids, pad_id)  # [B, P]
    prompts = prompts.repeat_interleave(group_size, dim=0)  # [N, P]
    pmask = pmask.repeat_interleave(group_size, dim=0)
    input_ids = torch.cat([prompts, completion_ids.cpu()], dim=1)
    attention_mask = torch.cat([pmask, completion_mask.cpu().long()], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return SequenceBatch(input_ids, attention_mask, position_ids, t)


def logprobs_from_logits(
    logits: torch.Tensor,  # [n, T, V]
    targets: torch.Tensor,  # [n, T]
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) per position, and the entropy of the distribution if asked (with grad only when
    entropy_grad: the entropy bonus needs it, the metric does not)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [n, T, V]
    token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [n, T]
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = -(logp.exp() * logp).sum(-1)  # [n, T]
    return token_logp, entropy


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
    is active) and `onednn.matmul_for`.
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
            grad_z = grad_z.to(h.dtype)
            if need_h:
                grad_h[part] = matmul(grad_z, weight.t(), None)  # [k, V] x [V, H]
            if need_w:
                with torch.autocast(grad_w.device.type, enabled=False):
                    grad_w.addmm_(grad_z.t().to(grad_w.dtype), h.to(grad_w.dtype))  # in place: no [V, H] per chunk
            if need_b:
                grad_b += grad_z.sum(dim=0)
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
        real = batch.attention_mask[:, -batch.completion_len :].bool()
        lp, ent = completion_logprobs_reference(model, batch, temperature, with_entropy, entropy_grad)
        real = real.to(lp.device)
        return lp.float() * real, ent.float() * real if ent is not None else None
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


# --- micro-batches ---------------------------------------------------------------------------


@dataclass
class MicroBatch:
    """Some rows of a SequenceBatch, cut to their own widest prompt and longest completion."""

    rows: torch.Tensor  # [n] long: row indices into the whole batch
    sequences: SequenceBatch  # [n, P' + T'], completion_len T' <= T

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """This micro-batch's part of a per-row [N] or per-token [N, T] tensor of the whole batch."""
        x = x[self.rows.to(x.device)]
        return x[:, : self.sequences.completion_len] if x.dim() == 2 else x


def plan_micro_batches(
    lengths: torch.Tensor,  # [N] long: prompt + completion tokens of each row, padding excluded
    max_rows: int,
    max_tokens: int | None = None,
) -> list[list[int]]:
    """Rows grouped into micro-batches: longest first, so each holds rows of similar length; at most
    max_rows rows, and (when max_tokens is set) at most max_tokens padded tokens (rows x the longest
    row) each. A row longer than max_tokens gets a micro-batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    plan: list[list[int]] = []
    for i in order:
        current = plan[-1] if plan else None
        fits = current is not None and len(current) < max_rows
        if fits and max_tokens is not None:
            fits = (len(current) + 1) * int(lengths[current[0]]) <= max_tokens
        if fits:
            current.append(i)
        else:
            plan.append([i])
    return [sorted(rows) for rows in plan]


def micro_batch(batch: SequenceBatch, rows: list[int]) -> MicroBatch:
    """The rows of batch, without the prompt columns that are padding in all of them and the completion
    columns past the longest of their completions."""
    index = torch.tensor(rows, dtype=torch.long)
    t = batch.completion_len
    mask = batch.attention_mask[index]  # [n, P + T]
    prompt_width = mask.shape[1] - t
    real = mask[:, :prompt_width].any(dim=0).nonzero()
    first = int(real[0]) if real.numel() else prompt_width
    width = max(int(mask[:, prompt_width:].sum(dim=1).max()), 1)  # completions are right-padded
    cols = slice(first, prompt_width + width)
    sequences = SequenceBatch(
        batch.input_ids[index, cols], mask[:, cols], batch.position_ids[index, cols], width
    )
    return MicroBatch(index, sequences)


def slice_batch(batch: SequenceBatch, rows: slice) -> SequenceBatch:
    return SequenceBatch(
        batch.input_ids[rows], batch.attention_mask[rows], batch.position_ids[rows], batch.completion_len
    )
