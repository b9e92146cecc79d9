"""Per-token log-probabilities of completions under a model.

Only completion positions get logits (`logits_to_keep`), never the prompt's.
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


def completion_logprobs(
    model: torch.nn.Module,
    batch: SequenceBatch,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[n, T] log-probs of the completion tokens (logits divided by the sampling temperature, as TRL)."""
    device = next(model.parameters()).device
    t = batch.completion_len
    out = model(
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        position_ids=batch.position_ids.to(device),
        logits_to_keep=t + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1, :]  # [n, T, V]: position P-1+j predicts completion token j
    if temperature != 1.0:
        logits = logits / temperature
    targets = batch.input_ids[:, -t:].to(device)
    return logprobs_from_logits(logits, targets, with_entropy, entropy_grad)


def slice_batch(batch: SequenceBatch, rows: slice) -> SequenceBatch:
    return SequenceBatch(
        batch.input_ids[rows], batch.attention_mask[rows], batch.position_ids[rows], batch.completion_len
    )
