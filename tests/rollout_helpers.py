"""References the rollout engine is checked against, shared by the engine and decoder tests."""

from __future__ import annotations

import torch

TEXTS = ["hello there", "2+2=", "What is the answer to this one?"]  # unequal lengths: left padding


def peaky(model, seed: int = 0):
    """`model` with large random weights (its matrices and projection biases): greedy outputs vary and
    log-probs are far from uniform. Returns the model."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 or name.endswith("proj.bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.25)
    return model


def naive_greedy(model, prompt: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    """Argmax decoding that recomputes the whole sequence at every step: no cache, no padding."""
    device = next(model.parameters()).device
    ids = list(prompt)
    out: list[int] = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([ids], device=device)).logits[0, -1]
        token = int(logits.argmax())
        out.append(token)
        ids.append(token)
        if token in eos:
            break
    return out


def reference_logprobs(model, prompt: list[int], completion: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) of each completion token, from one forward over prompt + completion
    (on the model's device; returned on the CPU)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion], device=device)).logits[0].float().cpu()  # [P+T, V]
    logits = logits[len(prompt) - 1 : len(prompt) + len(completion) - 1] / temperature  # [T, V]
    return logits.log_softmax(-1).gather(1, torch.tensor(completion).unsqueeze(1)).squeeze(1)


def rows_as_lists(rollout) -> list[list[int]]:
    return [row[mask].tolist() for row, mask in zip(rollout.completion_ids, rollout.completion_mask)]
