"""Sequences of prompt + completion tokens, the micro-batches they are computed in, and log-probs from
logits. Pure tensor code: how a model turns sequences into log-probs is the backend's (grpo.backend).

`plan_micro_batches` groups completions under a token budget (of similar length where the rows run padded, by
prompt where they run packed), and each micro-batch is cut to its own widest prompt and longest completion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    prompts: tuple[torch.Tensor, torch.Tensor] | None = None,  # [N] long each row's prompt, [N] its prompt tokens
) -> list[list[int]]:
    """Rows grouped into micro-batches of at most max_rows rows and (when max_tokens is set) max_tokens tokens
    each; a row longer than max_tokens gets a micro-batch of its own.

    Padded rows (`prompts` None): longest first, so each micro-batch holds rows of similar length, and its
    tokens are rows x the longest row. Packed rows (`prompts` given: grpo.backend.packed runs each distinct
    prompt of a micro-batch once, at the widest of them, and only the completions' own tokens): the rows of a
    prompt together, longest first within it, and a micro-batch's tokens are u x widest prompt + its completions'
    tokens (`packed_tokens`)."""
    if prompts is None:
        order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
        cost = lambda rows: len(rows) * int(lengths[rows[0]])  # noqa: E731  the longest comes first
    else:
        prompt_of, prompt_len = prompts
        first = {}
        for i, p in enumerate(prompt_of.tolist()):
            first.setdefault(p, i)
        order = sorted(range(len(lengths)), key=lambda i: (first[int(prompt_of[i])], -int(lengths[i]), i))
        cost = lambda rows: packed_tokens(lengths, prompt_of, prompt_len, rows)  # noqa: E731
    plan: list[list[int]] = []
    for i in order:
        current = plan[-1] if plan else None
        fits = current is not None and len(current) < max_rows
        if fits and max_tokens is not None:
            fits = cost(current + [i]) <= max_tokens
        if fits:
            current.append(i)
        else:
            plan.append([i])
    return [sorted(rows) for rows in plan]


def packed_tokens(lengths: torch.Tensor, prompt_of: torch.Tensor, prompt_len: torch.Tensor, rows: list[int]) -> int:
    """Tokens of `rows` packed (grpo.backend.packed): each distinct prompt once, padded to the widest of them, and
    every completion's own tokens. lengths [N] prompt + completion, prompt_of [N], prompt_len [N]."""
    index = torch.tensor(rows, dtype=torch.long)
    completions = int((lengths[index] - prompt_len[index]).sum())
    return len(set(prompt_of[index].tolist())) * int(prompt_len[index].max()) + completions


def distinct_prompts(batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The u distinct prompts of the rows (the same ids and padding), ids and mask [u, P] left-padded, and each
    row's among them, [N] long."""
    width = batch.input_ids.shape[1] - batch.completion_len  # P
    key = torch.cat([batch.input_ids[:, :width], batch.attention_mask[:, :width]], dim=1)  # [N, 2P]
    distinct, prompt_of = torch.unique(key, dim=0, return_inverse=True)  # [u, 2P], [N]
    return distinct[:, :width], distinct[:, width:], prompt_of


def prompt_groups(batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's prompt, [N] long (rows with the same prompt alike), and its prompt's tokens, [N]: the `prompts`
    of `plan_micro_batches` for rows run packed."""
    _, _, prompt_of = distinct_prompts(batch)
    return prompt_of, batch.attention_mask[:, : batch.input_ids.shape[1] - batch.completion_len].sum(dim=1)


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


def padding_micro_batch(batch: SequenceBatch) -> MicroBatch:
    """Row 0 cut to its last prompt token and first completion token: the least a forward pass runs on. A rank
    runs it (and discards what it gives) only to keep the same number of passes as the other ranks."""
    p = batch.input_ids.shape[1] - batch.completion_len  # prompts are left-padded: column p - 1 is real
    cols = slice(p - 1, p + 1)
    sequences = SequenceBatch(batch.input_ids[:1, cols], batch.attention_mask[:1, cols],
                              batch.position_ids[:1, cols], 1)
    return MicroBatch(torch.zeros(1, dtype=torch.long), sequences)


def slice_batch(batch: SequenceBatch, rows: slice) -> SequenceBatch:
    return SequenceBatch(
        batch.input_ids[rows], batch.attention_mask[rows], batch.position_ids[rows], batch.completion_len
    )
