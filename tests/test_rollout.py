"""Rollout engines: the fast engine against a naive full-recompute decode, and its sampling math by hand."""

from __future__ import annotations

import math

import pytest
import torch

from grpo.rollout import ENGINES, FastEngine, HFGenerateEngine, SamplingParams, make_engine
from grpo.rollout.base import stop_string_end
from grpo.rollout.cache import KVCache, fill_holes
from grpo.rollout.engine import filter_logits, sample_from_logits
from grpo.testing import tiny_model, tiny_tokenizer

from rollout_helpers import TEXTS, naive_greedy, peaky, reference_logprobs, rows_as_lists


def peaky_model(vocab_size: int, seed: int = 0):
    """The tiny Llama with larger random weights: greedy outputs vary and log-probs are far from uniform."""
    return peaky(tiny_model(vocab_size, seed=seed), seed)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return peaky_model(len(tok))


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok(t, add_special_tokens=False).input_ids for t in TEXTS]


# -- the fast engine against the naive decode -------------------------------------------------------


@pytest.mark.parametrize("group_size", [1, 3])
def test_greedy_equals_naive_decode(model, tok, prompts, group_size):
    engine = FastEngine(model, tok)
    rollout = engine.generate(prompts, group_size, SamplingParams(max_new_tokens=24, temperature=0.0))
    assert rollout.completion_ids.shape[0] == len(prompts) * group_size
    for n, row in enumerate(rows_as_lists(rollout)):
        assert row == naive_greedy(model, prompts[n // group_size], 24, engine.eos_ids), f"row {n}"


def test_eos_ends_a_row_and_is_in_the_mask(tok, prompts):
    model = peaky_model(len(tok))
    plain = rows_as_lists(FastEngine(model, tok).generate(prompts, 2, SamplingParams(24, temperature=0.0)))
    eos = plain[2][5]  # a token that greedy produces: make it an end-of-sequence token
    model.generation_config.eos_token_id = [tok.eos_token_id, eos]
    engine = FastEngine(model, tok)
    rollout = engine.generate(prompts, 2, SamplingParams(24, temperature=0.0))
    for n, row in enumerate(rows_as_lists(rollout)):
        assert row == naive_greedy(model, prompts[n // 2], 24, engine.eos_ids)
        expected = plain[n][: plain[n].index(eos) + 1] if eos in plain[n] else plain[n]
        assert row == expected
        assert bool(rollout.truncated[n]) == (eos not in plain[n])
        assert rollout.completion_ids[n, len(row) :].eq(tok.pad_token_id).all()
    assert rows_as_lists(rollout)[2][-1] == eos


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_match_a_separate_forward(model, tok, prompts, temperature):
    params = SamplingParams(max_new_tokens=16, temperature=temperature)
    rollout = FastEngine(model, tok).generate(prompts, 2, params, torch.Generator().manual_seed(0))
    for n, row in enumerate(rows_as_lists(rollout)):
        expected = reference_logprobs(model, prompts[n // 2], row, temperature)
        got = rollout.sampling_logprobs[n, : len(row)]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        assert rollout.sampling_logprobs[n, len(row) :].eq(0).all()


def test_top_k_samples_the_kept_tokens_and_reports_the_whole_tempered_logprobs(model, tok, prompts):
    """Top-k decides which tokens can be drawn; the log-prob reported is the tempered distribution's over the
    whole vocabulary (what the trainer computes), not the kept tokens' renormalized one (issue 27, item 11)."""
    params = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=5)
    rollout = FastEngine(model, tok).generate(prompts, 2, params, torch.Generator().manual_seed(3))
    for n, row in enumerate(rows_as_lists(rollout)):
        p = prompts[n // 2]
        with torch.no_grad():
            logits = model(torch.tensor([p + row])).logits[0, len(p) - 1 : len(p) + len(row) - 1] / 0.8
        top = logits.topk(5, dim=-1)  # [T, 5]
        assert all(t in top.indices[i].tolist() for i, t in enumerate(row))
        expected = reference_logprobs(model, p, row, 0.8)
        torch.testing.assert_close(rollout.sampling_logprobs[n, : len(row)], expected, rtol=0, atol=1e-4)


def test_same_seed_same_samples_different_seed_different(model, tok, prompts):
    engine = FastEngine(model, tok)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9)
    a = engine.generate(prompts, 4, params, torch.Generator().manual_seed(7))
    b = engine.generate(prompts, 4, params, torch.Generator().manual_seed(7))
    c = engine.generate(prompts, 4, params, torch.Generator().manual_seed(8))
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.sampling_logprobs, b.sampling_logprobs)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    assert len({tuple(r) for r in rows_as_lists(a)[:4]}) > 1  # the G samples of a group differ


def test_top_k_1_equals_greedy(model, tok, prompts):
    engine = FastEngine(model, tok)
    greedy = engine.generate(prompts, 2, SamplingParams(max_new_tokens=16, temperature=0.0))
    top1 = engine.generate(prompts, 2, SamplingParams(16, temperature=1.3, top_k=1), torch.Generator().manual_seed(1))
    assert torch.equal(greedy.completion_ids, top1.completion_ids)
    for n, row in enumerate(rows_as_lists(top1)):  # the whole tempered distribution's, not 0 (one kept token)
        expected = reference_logprobs(model, prompts[n // 2], row, 1.3)
        torch.testing.assert_close(top1.sampling_logprobs[n, : len(row)], expected, rtol=0, atol=1e-4)


def test_stop_strings_cut_rows_like_an_unstopped_run(model, tok, prompts):
    engine = FastEngine(model, tok)
    free = engine.generate(prompts, 3, SamplingParams(max_new_tokens=20), torch.Generator().manual_seed(5))
    free_rows = rows_as_lists(free)
    stop = tok.decode(free_rows[1][6:8])  # two characters that occur in a sample
    params = SamplingParams(max_new_tokens=20, stop=(stop,))
    stopped = engine.generate(prompts, 3, params, torch.Generator().manual_seed(5))
    cut_rows = 0
    for n, row in enumerate(rows_as_lists(stopped)):
        cut = stop_string_end(free_rows[n], tok, (stop,))
        assert row == free_rows[n][: cut or len(free_rows[n])]  # draws are per row: the prefix is the same sample
        if cut is not None:
            cut_rows += 1
            assert tok.decode(row).endswith(stop) and not bool(stopped.truncated[n])
        torch.testing.assert_close(stopped.sampling_logprobs[n, : len(row)], free.sampling_logprobs[n, : len(row)])
    assert cut_rows >= 1


def test_max_new_tokens_and_truncated_flags(model, tok, prompts):
    rollout = FastEngine(model, tok).generate(prompts, 2, SamplingParams(max_new_tokens=5), torch.Generator())
    assert rollout.completion_ids.shape[1] <= 5
    ended = [row[-1] in {tok.eos_token_id} for row in rows_as_lists(rollout)]
    expected = torch.tensor([not e and n == 5 for e, n in zip(ended, rollout.lengths.tolist())])
    assert torch.equal(rollout.truncated, expected)
    assert rollout.truncated.any()


def test_prompt_longer_than_the_context_is_a_clear_error(model, tok, prompts):
    engine = FastEngine(model, tok)  # the tiny model's context is 512
    with pytest.raises(ValueError, match=r"prompt 1 has 600 tokens.*512"):
        engine.generate([prompts[0], [5] * 600], 2, SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match=r"prompt 0 has 500 tokens; with max_new_tokens=20"):
        engine.generate([[5] * 500], 2, SamplingParams(max_new_tokens=20))


def test_bfloat16_model_runs_and_keeps_float32_logprobs(tok, prompts):
    model = peaky_model(len(tok)).to(torch.bfloat16)
    engine = FastEngine(model, tok)
    greedy = engine.generate(prompts, 2, SamplingParams(max_new_tokens=8, temperature=0.0))
    top1 = engine.generate(prompts, 2, SamplingParams(8, top_k=1), torch.Generator().manual_seed(0))
    # top-k keeps every token tied with the k-th (as transformers does), and bfloat16 logits tie: a row may
    # leave greedy's path only at an exact tie, where its token had probability 1/2 or less, not 1
    for g_row, t_row, t_logprobs in zip(greedy.completion_ids, top1.completion_ids, top1.sampling_logprobs):
        differ = (g_row != t_row).nonzero()
        t = int(differ[0]) if len(differ) else len(g_row)
        assert ((t_logprobs == 0) | (t_logprobs <= math.log(0.5) + 1e-6)).all()  # uniform over the tied tokens
        assert t == len(g_row) or float(t_logprobs[t]) <= math.log(0.5) + 1e-6
    assert greedy.sampling_logprobs.dtype == torch.float32
    first = naive_greedy(model, prompts[1], 1, engine.eos_ids)  # prompt 1 is the shortest: most padding
    assert rows_as_lists(greedy)[2][0] == first[0]


def test_outputs_can_enter_autograd_and_the_training_mode_is_restored(tok, prompts):
    model = peaky_model(len(tok)).train()
    rollout = FastEngine(model, tok).generate(prompts, 2, SamplingParams(max_new_tokens=6), torch.Generator())
    assert model.training
    assert not rollout.completion_ids.is_inference() and not rollout.sampling_logprobs.is_inference()
    ids = torch.tensor([prompts[0] + rows_as_lists(rollout)[0]])
    model(ids).logits.sum().backward()  # completion ids as the embedding's indices: no inference tensors
    assert model.model.embed_tokens.weight.grad is not None


# -- the sampling math by hand ----------------------------------------------------------------------


def test_filter_logits_by_hand():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()  # probabilities, as logits
    probs = lambda lg: lg.softmax(-1)[0].tolist()  # noqa: E731
    assert probs(filter_logits(logits, 1.0, top_p=0.7)) == pytest.approx([0.625, 0.375, 0, 0], abs=1e-6)
    assert probs(filter_logits(logits, 1.0, top_p=0.5)) == pytest.approx([1, 0, 0, 0], abs=1e-6)
    top3 = [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]
    assert probs(filter_logits(logits, 1.0, top_k=3)) == pytest.approx(top3, abs=1e-6)
    assert probs(filter_logits(logits, 1.0, min_p=0.4)) == pytest.approx([0.625, 0.375, 0, 0], abs=1e-6)
    squared = [p * p for p in (0.5, 0.3, 0.15, 0.05)]  # temperature 0.5 squares the probabilities
    assert probs(filter_logits(logits, 0.5)) == pytest.approx([s / sum(squared) for s in squared], abs=1e-6)
    assert probs(filter_logits(logits, 1.0, top_p=0.0)) == pytest.approx([1, 0, 0, 0], abs=1e-6)  # never empty
    assert probs(filter_logits(logits, 1.0, min_p=2.0)) == pytest.approx([1, 0, 0, 0], abs=1e-6)
    both = probs(filter_logits(logits, 1.0, top_k=3, top_p=0.8))  # top-k first, then top-p on the rest
    assert both == pytest.approx([0.5 / 0.8, 0.3 / 0.8, 0, 0], abs=1e-6)


def test_inverse_cdf_sampling_matches_the_probabilities():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    logits = probs.log().expand(1000, 4)  # [1000, 4], -inf for the impossible token
    uniform = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000  # an even grid instead of random draws
    tokens, logprobs = sample_from_logits(logits, uniform)
    assert torch.bincount(tokens, minlength=4).tolist() == [100, 0, 600, 300]
    torch.testing.assert_close(logprobs, probs.log()[tokens], rtol=0, atol=1e-6)
    edge, _ = sample_from_logits(logits[:1], torch.tensor([1.0 - 1e-16], dtype=torch.float64))
    assert edge.item() == 3  # never past the last possible token


def test_kv_cache_verbs(monkeypatch):
    monkeypatch.setattr(KVCache, "BLOCK", 1)
    cache = KVCache(num_layers=1, max_rows=4, max_len=6)
    cache.reserve(3)
    k = torch.arange(2 * 3, dtype=torch.float32).view(2, 1, 3, 1)  # [rows=2, heads=1, q=3, dim=1]
    keys, _ = cache.update(k, -k, 0)
    assert keys.shape == (2, 1, 3, 1) and torch.equal(keys, k)
    cache.advance(3)
    cache.repeat_rows(2, 2)  # rows 0, 0, 1, 1
    layer = cache.layers[0]
    assert layer.keys.shape == (4, 1, 4, 1)  # capacity 3 + BLOCK
    assert layer.keys[:, 0, :3, 0].tolist() == [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]]
    cache.keep_rows(torch.tensor([1, 2]))
    cache.reserve(4)  # fits: no new buffers
    step = torch.tensor([10.0, 20.0]).view(2, 1, 1, 1)
    keys, values = cache.update(step, step, 0)  # the next token of the 2 remaining rows
    assert keys[:, 0, :, 0].tolist() == [[0, 1, 2, 10], [3, 4, 5, 20]]
    assert torch.equal(values[:, 0, 3, 0], torch.tensor([10.0, 20.0]))
    cache.advance(1)
    cache.reserve(5)  # grows: the new buffers hold only the 2 live rows
    assert layer.keys.shape == (2, 1, 6, 1) and layer.keys[:, 0, :4, 0].tolist() == [[0, 1, 2, 10], [3, 4, 5, 20]]


def test_rows_that_end_leave_the_cache_with_few_rows_moved():
    """fill_holes keeps the rows that did not end, moving tail rows into the places of those that did;
    the cache then holds each kept row's keys and values at its new place."""
    assert fill_holes(torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.bool)).tolist() == [0, 5, 2, 3]
    assert fill_holes(torch.tensor([1, 1, 0, 0], dtype=torch.bool)).tolist() == [2, 3]
    assert fill_holes(torch.tensor([0, 0, 1], dtype=torch.bool)).tolist() == [0, 1]
    assert fill_holes(torch.tensor([1, 1], dtype=torch.bool)).tolist() == []
    torch.manual_seed(0)
    for _ in range(20):
        ended = torch.rand(12) < 0.4
        index = fill_holes(ended)
        assert sorted(index.tolist()) == (~ended).nonzero().squeeze(1).tolist()
        stays = index == torch.arange(index.numel())
        assert int((~stays).sum()) == int(ended[: index.numel()].sum())  # one move per hole, no more

    cache = KVCache(num_layers=2, max_rows=6, max_len=4)
    cache.reserve(3)
    k = torch.arange(6 * 3, dtype=torch.float32).view(6, 1, 3, 1)  # [rows, heads, positions, dim]
    for layer in cache.layers:
        layer.update(k, -k)
    cache.advance(3)
    original = cache.layers[0].keys.clone()
    cache.keep_rows(fill_holes(torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.bool)))
    for layer in cache.layers:
        keys, values = layer.keys[: cache.rows, 0, :3, 0], layer.values[: cache.rows, 0, :3, 0]
        assert keys.tolist() == k[[0, 5, 2, 3], 0, :, 0].tolist()
        assert torch.equal(values, -keys)
    assert torch.equal(cache.layers[0].keys[[0, 2, 3, 4, 5]], original[[0, 2, 3, 4, 5]])  # only row 1 rewritten


def test_a_cache_that_grows_block_by_block_gives_the_same_completions_with_rows_ending_apart(tok, prompts, monkeypatch):
    model = peaky_model(len(tok))
    model.generation_config.eos_token_id = [tok.eos_token_id] + tok.convert_tokens_to_ids(list("aeiou"))
    params = SamplingParams(max_new_tokens=20)  # rows end at different steps: growths also drop rows
    whole = FastEngine(model, tok).generate(prompts, 3, params, torch.Generator().manual_seed(2))
    monkeypatch.setattr(KVCache, "BLOCK", 3)
    grown = FastEngine(model, tok).generate(prompts, 3, params, torch.Generator().manual_seed(2))
    assert torch.equal(whole.completion_ids, grown.completion_ids)
    torch.testing.assert_close(whole.sampling_logprobs, grown.sampling_logprobs, rtol=0, atol=1e-5)
    assert len(set(grown.lengths.tolist())) >= 4
    # rows left the batch in fill_holes' order (tail rows moved into their places): each row's log-probs
    # are still those of its own prompt and completion
    for n, row in enumerate(rows_as_lists(grown)):
        expected = reference_logprobs(model, prompts[n // 3], row)
        torch.testing.assert_close(grown.sampling_logprobs[n, : len(row)], expected, rtol=0, atol=1e-4)


# -- the registry and the reference engine ----------------------------------------------------------


def test_registry_builds_each_engine_from_its_config_section(model, tok):
    from grpo.config import ConfigError, load_config

    assert set(ENGINES) == {"hf", "fast", "vllm"}  # vllm: tests/test_vllm.py, in .venv-vllm
    assert isinstance(make_engine(load_config(None, ["sampling.engine=hf"]).sampling, model, tok), HFGenerateEngine)
    fast = make_engine(load_config(None, ["sampling.prepack=false", "sampling.fused=false"]).sampling, model, tok)
    assert isinstance(fast, FastEngine) and fast._prepack is False and fast._fused is False
    default = make_engine(load_config(None, []).sampling, model, tok)  # fused where supported, prepacked
    assert default._prepack is True and default._fused is None
    with pytest.raises(ConfigError, match="sampling.engine"):
        load_config(None, ["sampling.engine=vllm-typo"])


def test_hf_engine_shapes_and_mask(model, tok, prompts):
    rollout = HFGenerateEngine(model, tok).generate(prompts, 2, SamplingParams(8), torch.Generator().manual_seed(0))
    n, t = rollout.completion_ids.shape
    assert n == 6 and t <= 8 and rollout.completion_mask.shape == (n, t)
    assert rollout.completion_mask.dtype == torch.bool and rollout.truncated.shape == (n,)
    assert rollout.sampling_logprobs.shape == (n, t)
    assert torch.isfinite(rollout.sampling_logprobs[rollout.completion_mask]).all()
    assert (rollout.sampling_logprobs[rollout.completion_mask] <= 0).all()
    assert math.isclose(float(rollout.sampling_logprobs[~rollout.completion_mask].abs().sum()), 0.0)
    for n, row in enumerate(rows_as_lists(rollout)):  # no top-k/top-p: the model's own distribution
        expected = reference_logprobs(model, prompts[n // 2], row, 1.0)
        torch.testing.assert_close(rollout.sampling_logprobs[n, : len(row)], expected, rtol=0, atol=1e-4)


def test_two_level_inverse_cdf_over_many_blocks():
    probs = torch.rand(1000, generator=torch.Generator().manual_seed(0)) ** 4  # uneven, across 4 blocks of 256
    probs[[3, 400, 999]] = 0.0
    probs = probs / probs.sum()
    k = 20_000
    uniform = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    tokens, _ = sample_from_logits(probs.log().expand(k, 1000), uniform)
    counts = torch.bincount(tokens, minlength=1000).double()
    assert (counts - probs.double() * k).abs().max() <= 1.0  # each token gets its share of the grid, +-1
    assert counts[[3, 400, 999]].eq(0).all()


def test_a_bfloat16_copy_follows_the_policy_weights(tok, prompts):
    model = peaky_model(len(tok))
    engine = FastEngine(model, tok, dtype="bfloat16")
    assert next(engine.runner.parameters()).dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.float32
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    before = engine.generate(prompts, 1, params).completion_ids
    with torch.no_grad():  # an optimizer step, in place: the copy holds the old weights until it is told
        model.lm_head.weight[before[0, 0]] -= 10.0
    assert torch.equal(engine.generate(prompts, 1, params).completion_ids, before)
    engine.sync_weights(model)  # what the trainer calls after every update
    after = engine.generate(prompts, 1, params).completion_ids
    assert after[0, 0] != before[0, 0]
    assert torch.equal(after, FastEngine(model, tok, dtype="bfloat16").generate(prompts, 1, params).completion_ids)
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        FastEngine(model, tok, dtype="fp8")


def test_onednn_linears_packed_or_not_equal_the_default_kernel_and_are_removed_after(model, tok, prompts):
    params = SamplingParams(max_new_tokens=12, temperature=0.9)
    fast = FastEngine(model, tok, onednn=True).generate(prompts, 2, params, torch.Generator().manual_seed(2))
    plain = FastEngine(model, tok, onednn=False).generate(prompts, 2, params, torch.Generator().manual_seed(2))
    unpacked = FastEngine(model, tok, onednn=True, prepack=False).generate(prompts, 2, params, torch.Generator().manual_seed(2))
    for other in (plain, unpacked):
        assert torch.equal(fast.completion_ids, other.completion_ids)
        torch.testing.assert_close(fast.sampling_logprobs, other.sampling_logprobs, rtol=0, atol=1e-5)
    assert not any("forward" in m.__dict__ or "_onednn_packed" in m.__dict__ for m in model.modules())  # as it was
    with pytest.raises(ValueError, match="onednn=True needs float32 or bfloat16"):
        FastEngine(peaky_model(len(tok)).to(torch.float16), tok, onednn=True).generate(prompts, 1, params)


def test_prefill_in_chunks_gives_the_same_completions(model, tok, prompts, monkeypatch):
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    whole = FastEngine(model, tok).generate(prompts, 2, params)
    monkeypatch.setattr("grpo.rollout.engine.PREFILL_TOKENS", 1)  # one prompt per forward
    chunked = FastEngine(model, tok).generate(prompts, 2, params)
    assert torch.equal(whole.completion_ids, chunked.completion_ids)
    torch.testing.assert_close(whole.sampling_logprobs, chunked.sampling_logprobs, rtol=0, atol=1e-5)


def test_sliding_window_models_are_refused_past_the_window(tok, prompts):
    from types import SimpleNamespace

    from grpo.rollout.engine import sliding_window

    assert sliding_window(SimpleNamespace(sliding_window=8, layer_types=["sliding_attention", "full_attention"])) == 8
    assert sliding_window(SimpleNamespace(sliding_window=8, layer_types=["full_attention"])) is None
    assert sliding_window(SimpleNamespace(sliding_window=8, use_sliding_window=False)) is None
    assert sliding_window(SimpleNamespace()) is None
    model = peaky_model(len(tok))
    model.config.sliding_window = 12
    engine = FastEngine(model, tok)
    engine.generate([prompts[1]], 1, SamplingParams(max_new_tokens=4))  # 4 + 4 tokens fit in 12
    with pytest.raises(ValueError, match=r"sliding-window attention over 12 positions.*longest prompt \(11 tokens\)"):
        engine.generate(prompts[:2], 1, SamplingParams(max_new_tokens=4))


@pytest.mark.parametrize(
    "temperature, top_k, top_p, min_p",
    [(0.7, 0, 0.9, 0.0), (1.3, 10, 1.0, 0.0), (1.0, 20, 0.8, 0.05), (0.9, 0, 1.0, 0.1)],
)
def test_filter_logits_equals_the_transformers_warpers(temperature, top_k, top_p, min_p):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(top_k)) * 3  # [n, V]
    chain = [TemperatureLogitsWarper(temperature)]
    chain += [TopKLogitsWarper(top_k)] if top_k else []
    chain += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    chain += [MinPLogitsWarper(min_p)] if min_p else []
    expected = LogitsProcessorList(chain)(torch.zeros(8, 1, dtype=torch.long), logits.clone()).softmax(-1)
    got = filter_logits(logits, temperature, top_k, top_p, min_p).softmax(-1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_sampled_rows_that_end_early_keep_exact_logprobs(tok, prompts):
    model = peaky_model(len(tok))
    model.generation_config.eos_token_id = [tok.eos_token_id] + tok.convert_tokens_to_ids(list("aeiou"))
    engine = FastEngine(model, tok)  # a vowel ends a row: rows end at different steps and the batch shrinks
    rollout = engine.generate(prompts, 4, SamplingParams(max_new_tokens=16), torch.Generator().manual_seed(4))
    lengths = rollout.lengths.tolist()
    assert len(set(lengths)) >= 4 and rollout.stats["decode_row_steps"] < 12 * 16  # the batch did shrink
    for n, row in enumerate(rows_as_lists(rollout)):
        assert all(t not in engine.eos_ids for t in row[:-1])
        expected = reference_logprobs(model, prompts[n // 4], row, 1.0)
        torch.testing.assert_close(rollout.sampling_logprobs[n, : len(row)], expected, rtol=0, atol=1e-4)


# -- the real default model (slow: run with -m slow) -------------------------------------------------


@pytest.fixture(scope="module")
def smollm():
    from grpo.models import ModelError, load_model, load_tokenizer, resolve_model_folder

    try:
        folder = resolve_model_folder(None, log=lambda *_: None)
    except ModelError as e:
        pytest.skip(str(e))
    model, tok = load_model(folder).eval(), load_tokenizer(folder)
    questions = ["What is 23 + 45?", "Name three colors."]
    chats = [[{"role": "user", "content": q}] for q in questions]
    text = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    return model, tok, [tok(t, add_special_tokens=False).input_ids for t in text]


@pytest.mark.slow
def test_default_model_greedy_matches_generate_up_to_near_ties(smollm):
    model, tok, prompts = smollm
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    ours = rows_as_lists(FastEngine(model, tok).generate(prompts, 2, params))
    theirs = rows_as_lists(HFGenerateEngine(model, tok).generate(prompts, 2, params))
    for n, (a, b) in enumerate(zip(ours, theirs)):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if same is None:
            assert len(a) == len(b) or (len(a) == 24 and len(b) == 24), f"row {n}"
            continue
        with torch.no_grad():  # they may part only where the two best tokens are (numerically) tied
            top2 = model(torch.tensor([prompts[n // 2] + a[:same]])).logits[0, -1].topk(2).values
        assert float(top2[0] - top2[1]) < 1e-3, f"row {n} differs at token {same} without a near tie"


@pytest.mark.slow
def test_default_model_sampling_logprobs_match_a_forward(smollm):
    model, tok, prompts = smollm
    params = SamplingParams(max_new_tokens=24, temperature=0.7)
    rollout = FastEngine(model, tok).generate(prompts, 4, params, torch.Generator().manual_seed(0))
    for n, row in enumerate(rows_as_lists(rollout)):
        expected = reference_logprobs(model, prompts[n // 4], row, 0.7)
        torch.testing.assert_close(rollout.sampling_logprobs[n, : len(row)], expected, rtol=0, atol=1e-4)
