"""Each group's prompt run once, in the same decoder pass as the completions: every token of a micro-batch packed
into one sequence, so each layer's matmuls run once on [u*P + C, D] and each weight's gradient is one matmul.
Only the completions' real tokens are packed (C of the n*T; completions are right-padded to the longest): a
micro-batch of completions of mixed lengths runs no padding through the layers.

The other way to run a prompt once (grpo.backend.lean, through the model's KV cache) calls the decoder twice:
once on the u distinct prompts, once on the n completions with the prompts' cache. Every weight is then used
by two matmuls, whose gradients autograd adds out of place, and the prompts' weight gradients are products
of a few dozen rows that cost nearly as much as the completions' (each writes the whole [out, in] gradient).
Packed, one weight gradient per weight and micro-batch, from one matmul (the measurements of both changes are in
benchmarks/RESULTS_train.md).

Only the attention knows the packing. For the length of one decoder call, transformers' `sdpa` attention entry
is wrapped (`_packed_attention`): the wrapper splits the packed queries, keys and values it is handed (after
the model's own projections, q/k norms and rotary embedding, each token at its own position) and attends

    the prompts     [u, heads, P, hd]: causal among each prompt's tokens, its left padding masked;
    the completions [n, heads, T, hd]: over the row's prompt (its keys and values gathered per row, so the
        gradients of the G rows of a group flow back into one computation) and, causally, the row's own tokens
        (laid out padded for the attention alone, zeros at the padding, which no real token attends to: a row's
        padding comes after its tokens; a padding query's output is dropped),

each through the entry it wrapped (transformers' sdpa, or grpo.backend.plain's float32 attention under a CPU
bfloat16 autocast), then hands back the packed output. Everything else in the layers works token by token.

Vocabulary: n rows, u distinct prompts among them, P prompt width (left-padded), T completion width, C real
completion tokens, L = u*P + C packed tokens, D hidden size.

It applies (`packable`) to the model families whose decoder is attention and per-token layers only (PACKABLE_TYPES)
running transformers' `sdpa` attention, with full attention in every layer, without gradient checkpointing (a
checkpointed layer recomputes its forward in the backward pass, after the wrapper is gone). Elsewhere the caller
takes the cache path. As a guard, the result is used only if the wrapper attended once per layer.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from grpo.backend.sdpa import wrapping_sdpa

# Decoder-only families whose layers mix tokens only through attention (no convolution, recurrence or state
# across a sequence), so that packing changes nothing but the attention, which `_packed_attention` does.
PACKABLE_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def packable(decoder: torch.nn.Module) -> bool:
    """Whether `packed_hidden` can run `decoder` (see the module docstring); the caller has ruled out sliding
    windows and gradient checkpointing."""
    config = getattr(decoder, "config", None)
    return (
        getattr(config, "model_type", None) in PACKABLE_TYPES
        and getattr(config, "_attn_implementation", None) == "sdpa"
        and isinstance(getattr(decoder, "layers", None), torch.nn.ModuleList)
    )


@dataclass
class Packing:
    """Where each part of the packed sequence is, and the two attention masks (True: attended)."""

    prompts: int  # u
    width: int  # P
    rows: torch.Tensor  # [n] long: each row's prompt among the u
    completion_len: int  # T
    prompt_mask: torch.Tensor  # [u, 1, P, P] causal within each prompt, its padding masked
    completion_mask: torch.Tensor  # [n, 1, T, P + T] the row's prompt (not its padding), then its own tokens causally
    real: torch.Tensor | None  # [C] long: the real completion tokens' places in [n * T]; None: all n * T are real
    thread: int  # the thread whose decoder call this is: another thread's attention is left alone
    calls: int = 0

    @property
    def length(self) -> int:  # L
        completions = self.rows.shape[0] * self.completion_len if self.real is None else self.real.shape[0]
        return self.prompts * self.width + completions


def packing(prompt_mask: torch.Tensor, rows: torch.Tensor, completion_mask: torch.Tensor) -> Packing:
    """The packing of u prompts ([u, P] attention mask, left-padded) and n completions ([n, T] mask, right-padded),
    row i continuing prompt rows[i]; only the completions' real tokens are packed."""
    (u, P), (n, T), device = prompt_mask.shape, completion_mask.shape, prompt_mask.device
    real = completion_mask.flatten().nonzero().squeeze(1)  # [C]
    real = None if real.shape[0] == n * T else real
    valid = prompt_mask.bool()  # [u, P]
    causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
    # a padding query attends to itself only: no row of the softmax is empty (its output is never read)
    own_key = torch.eye(P, dtype=torch.bool, device=device)
    prompt = (causal & valid[:, None, :]) | own_key  # [u, P, P]
    own = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # [T, T]
    completion = torch.cat([valid[rows][:, None, :].expand(n, T, P), own.expand(n, T, T)], dim=-1)  # [n, T, P + T]
    return Packing(u, P, rows, T, prompt[:, None], completion[:, None], real, threading.get_ident())


def _packed_attention(inner, pack: Packing, module, query, key, value, attention_mask, *args, **kwargs):
    """transformers' attention signature on the packed sequence: query [1, H, L, hd], key and value [1, K, L,
    hd] -> ([1, L, H, hd], None), the prompts and the completions attended apart by `inner`. A call that is not
    the packed decoder's (another thread, another length) goes to `inner` as it came."""
    if threading.get_ident() != pack.thread or query.shape[0] != 1 or query.shape[2] != pack.length:
        return inner(module, query, key, value, attention_mask, *args, **kwargs)
    pack.calls += 1
    u, P, n, T = pack.prompts, pack.width, pack.rows.shape[0], pack.completion_len
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [L, heads, hd] each
    split = u * P
    qp, kp, vp = (x[:split].unflatten(0, (u, P)).transpose(1, 2) for x in (q, k, v))  # [u, heads, P, hd]
    qc, kc, vc = (_padded(x[split:], pack.real, n * T).unflatten(0, (n, T)).transpose(1, 2)
                  for x in (q, k, v))  # [n, heads, T, hd]
    prompts, _ = inner(module, qp, kp, vp, pack.prompt_mask, *args, **kwargs)  # [u, P, H, hd]
    keys = torch.cat([kp.index_select(0, pack.rows), kc], dim=2)  # [n, K, P + T, hd]
    values = torch.cat([vp.index_select(0, pack.rows), vc], dim=2)
    completions, _ = inner(module, qc, keys, values, pack.completion_mask, *args, **kwargs)  # [n, T, H, hd]
    completions = _real(completions.flatten(0, 1), pack.real)  # [C, H, hd]: a padding query's output is dropped
    return torch.cat([prompts.flatten(0, 1), completions])[None], None  # [1, L, H, hd]


def _real(x: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """[n * T, ...] -> [C, ...]: the real tokens' rows (x itself where `real` is None)."""
    return x if real is None else x.index_select(0, real)


def _padded(x: torch.Tensor, real: torch.Tensor | None, size: int) -> torch.Tensor:
    """[C, ...] real tokens -> [size, ...] with zeros at the padding (x itself where `real` is None)."""
    return x if real is None else x.new_zeros((size, *x.shape[1:])).index_copy(0, real, x)


def packed_hidden(
    decoder: torch.nn.Module,
    prompt_ids: torch.Tensor,  # [u, P] left-padded
    prompt_mask: torch.Tensor,  # [u, P]
    rows: torch.Tensor,  # [n] long: row i continues prompt rows[i]
    completion_ids: torch.Tensor,  # [n, T]
    completion_positions: torch.Tensor,  # [n, T]
    completion_mask: torch.Tensor,  # [n, T] right-padded: only the real tokens are run
) -> torch.Tensor | None:
    """[n, T + 1, D]: the decoder's output at each row's last prompt position and at its T completion positions,
    from one pass over the packed sequence. None if the model did not attend once per layer through the wrapper
    (the caller then takes another path)."""
    u, P = prompt_ids.shape
    n, T = completion_ids.shape
    prompt_positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)  # [u, P]
    pack = packing(prompt_mask, rows, completion_mask)
    ids = torch.cat([prompt_ids.flatten(), _real(completion_ids.flatten(), pack.real)])[None]  # [1, L]
    positions = torch.cat([prompt_positions.flatten(), _real(completion_positions.flatten(), pack.real)])[None]
    # an already-made 4D mask: transformers builds none (the wrapper masks), and hands this one on unread
    unread = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=ids.device)
    with wrapping_sdpa(_packed_attention, pack):  # around the entry it finds: float32 attention's, say
        out = decoder(input_ids=ids, attention_mask=unread, position_ids=positions, use_cache=False)
    if pack.calls != len(decoder.layers):
        return None
    hidden = out.last_hidden_state[0]  # [L, D]
    last = hidden[: u * P].unflatten(0, (u, P))[:, -1].index_select(0, rows)  # [n, D] (prompts are left-padded)
    completions = _padded(hidden[u * P :], pack.real, n * T).unflatten(0, (n, T))  # [n, T, D], zeros at padding
    return torch.cat([last[:, None], completions], dim=1)  # [n, T + 1, D]
