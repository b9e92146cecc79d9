"""Prompts and completions in one packed decoder pass (grpo.backend.packed): the same log-probs, entropies and
gradients as the full-logits reference (each row's whole sequence through the model's own forward), for each
family it packs, on random batches: prompts and completions of mixed lengths, groups of mixed sizes, rows in
any order. And where it must stand aside, it does."""

import threading

import pytest
import torch

from grpo.backend import packed
from grpo.backend.cpu_fast import completion_logprobs
from grpo.backend.plain import completion_logprobs_reference, float32_attention
from grpo.core.logprobs import SequenceBatch, build_sequences
from grpo.testing import tiny_model

from test_decoder import tiny
from test_logprobs import loss_and_grads


def random_groups(vocab: int, seed: int, full: bool = False):
    """2-4 prompts of 1-10 tokens, each with 1-4 completions of 1-8 tokens (right-padded; with `full` all 8), the
    rows shuffled: a SequenceBatch and its completion mask."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))
    prompts = [torch.randint(4, vocab, (draw(1, 10),), generator=g).tolist() for _ in range(draw(2, 4))]
    sizes = [draw(1, 4) for _ in prompts]
    prompts = [p for p, size in zip(prompts, sizes) if size > 1] or prompts[:1]  # a group of one: no sharing
    sizes = [size for size in sizes if size > 1] or [2]
    width = 8
    parts = []
    for prompt, size in zip(prompts, sizes):
        ids = torch.randint(4, vocab, (size, width), generator=g)
        lengths = torch.full((size,), width) if full else torch.randint(1, width + 1, (size,), generator=g)
        mask = torch.arange(width)[None, :] < lengths[:, None]
        ids[~mask] = 1
        parts.append((build_sequences([prompt], ids, mask, pad_id=1), mask))
    pad = max(b.input_ids.shape[1] for b, _ in parts)

    def left(x, value):  # [n, S] -> [n, pad]: the prompt side padded on the left
        return torch.nn.functional.pad(x, (pad - x.shape[1], 0), value=value)

    ids = torch.cat([left(b.input_ids, 1) for b, _ in parts])
    attention = torch.cat([left(b.attention_mask, 0) for b, _ in parts])
    positions = torch.cat([left(b.position_ids, 0) for b, _ in parts])
    mask = torch.cat([m for _, m in parts])
    order = torch.randperm(ids.shape[0], generator=g)
    batch = SequenceBatch(ids[order], attention[order], positions[order], width)
    return batch, mask[order]


def packed_passes(model, batch, **kwargs):
    """How many packed decoder passes one log-prob pass makes (the embedding sees [1, L] ids)."""
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0] == 1))
    with torch.no_grad():
        completion_logprobs(model, batch, **kwargs)
    handle.remove()
    return sum(seen)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "qwen3"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_packed_equals_the_full_logits_reference(kind, seed):
    """Only the completions' real tokens are packed (seed 3: none is padded, nothing is left out)."""
    model = tiny(kind, 100, tied=seed % 2 == 0, seed=seed).train()
    batch, mask = random_groups(100, seed, full=seed == 3)
    assert packed_passes(model, batch) == 1  # the packed path ran, not a fallback
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(seed + 5))
    ref = loss_and_grads(model, completion_logprobs_reference, batch, mask, weights)
    got = loss_and_grads(model, lambda *a, **k: completion_logprobs(*a, **k, chunk_tokens=7), batch, mask, weights)
    assert float(ref[2].abs().max()) > 1
    for r, c in zip(ref, got):  # values, entropy, every parameter's gradient
        torch.testing.assert_close(c, r, rtol=1e-4, atol=1e-4)


def test_distinct_prompts_are_packed_too():
    """Rows that share no prompt (groups of one) are packed as well, their completions' padding left out."""
    model = tiny("qwen2", 100, tied=False, seed=7).train()
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(4, 100, (n,), generator=g).tolist() for n in (3, 8, 1)]
    ids = torch.randint(4, 100, (3, 6), generator=g)
    mask = torch.arange(6)[None, :] < torch.tensor([2, 6, 4])[:, None]
    batch = build_sequences(prompts, ids, mask, pad_id=1)
    assert packed_passes(model, batch) == 1
    weights = torch.randn(mask.shape, generator=g)
    ref = loss_and_grads(model, completion_logprobs_reference, batch, mask, weights)
    got = loss_and_grads(model, completion_logprobs, batch, mask, weights)
    for r, c in zip(ref, got):
        torch.testing.assert_close(c, r, rtol=1e-4, atol=1e-4)


def test_packed_equals_the_cache_path_under_a_bfloat16_autocast():
    """Under a CPU bfloat16 autocast (float32 attention, as the backends run it) the packed pass and the one
    through the KV cache round alike but for the order of their sums."""
    model = tiny_model(100, seed=4).train()
    batch, mask = random_groups(100, 4)
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(9))
    results = []
    for implementation in ("sdpa", "eager"):
        model.set_attn_implementation(implementation)
        with torch.autocast("cpu", dtype=torch.bfloat16), float32_attention():
            results.append(loss_and_grads(model, completion_logprobs, batch, mask, weights))
    model.set_attn_implementation("sdpa")
    assert packed_passes(model, batch) == 1
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)


def test_a_model_that_does_not_attend_through_the_wrapper_takes_the_cache_path(monkeypatch):
    """The guard: a decoder whose layers did not all call the wrapped sdpa entry (here: eager attention, let
    through `packable`) gets the KV-cache path, with the reference's results."""
    model = tiny_model(100, seed=5).train()
    model.set_attn_implementation("eager")
    monkeypatch.setattr("grpo.backend.lean.packable", lambda decoder: True)
    batch, mask = random_groups(100, 5)
    results = []

    def recorded(*args):
        results.append(packed.packed_hidden(*args))
        return results[-1]

    monkeypatch.setattr("grpo.backend.lean.packed_hidden", recorded)
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(6))
    ref = loss_and_grads(model, completion_logprobs_reference, batch, mask, weights)
    got = loss_and_grads(model, completion_logprobs, batch, mask, weights)
    assert results == [None]  # tried, refused by the guard
    for r, c in zip(ref, got):
        torch.testing.assert_close(c, r, rtol=1e-4, atol=1e-4)


def test_packable_only_for_sdpa_full_attention_families():
    model = tiny_model(100)
    assert packed.packable(model.model)
    model.set_attn_implementation("eager")
    assert not packed.packable(model.model)
    model.set_attn_implementation("sdpa")
    model.config.model_type = "mamba"
    assert not packed.packable(model.model)


def test_masks_match_a_loop():
    prompt_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])  # [u, P] left-padded
    rows = torch.tensor([2, 0, 0, 1, 2])
    lengths = torch.tensor([3, 1, 2, 3, 3])
    pack = packed.packing(prompt_mask, rows, torch.arange(3)[None, :] < lengths[:, None])
    u, P, n, T = 3, 4, 5, 3
    for b in range(u):
        for i in range(P):
            for j in range(P):
                assert bool(pack.prompt_mask[b, 0, i, j]) == (i == j or (j <= i and bool(prompt_mask[b, j])))
    for r in range(n):
        for i in range(T):
            for j in range(P + T):
                want = bool(prompt_mask[rows[r], j]) if j < P else j - P <= i
                assert bool(pack.completion_mask[r, 0, i, j]) == want
    assert pack.length == u * P + int(lengths.sum())  # the completions' padding is not packed
    assert pack.real.tolist() == [0, 1, 2, 3, 6, 7, 9, 10, 11, 12, 13, 14]  # the real tokens' places in [n * T]
    assert packed.packing(prompt_mask, rows, torch.ones(n, T, dtype=torch.bool)).real is None


def test_attention_of_another_thread_or_length_is_left_alone():
    pack = packed.packing(torch.ones(1, 2), torch.tensor([0, 0]), torch.ones(2, 1, dtype=torch.bool))
    inner = lambda *a, **k: "inner"
    q = torch.zeros(1, 2, pack.length, 4)
    assert packed._packed_attention(inner, pack, None, q[:, :, :3], q[:, :, :3], q[:, :, :3], None) == "inner"
    other = []
    thread = threading.Thread(target=lambda: other.append(packed._packed_attention(inner, pack, None, q, q, q, None)))
    thread.start()
    thread.join()
    assert other == ["inner"] and pack.calls == 0


def test_runs_packed_says_where_the_rows_are_packed():
    """What the trainer budgets its micro-batches by: packed passes for a packable model, not in a training pass
    under gradient checkpointing, nor with a sliding window shorter than the rows, nor for eager attention."""
    from grpo.backend.lean import runs_packed

    model = tiny_model(100)
    assert runs_packed(model, 64) and not runs_packed(model, 64, checkpointing=True)
    model.config.sliding_window = 32
    assert runs_packed(model, 32) and not runs_packed(model, 33)
    model.config.sliding_window = None
    model.set_attn_implementation("eager")
    assert not runs_packed(model, 64)
