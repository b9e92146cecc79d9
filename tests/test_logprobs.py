"""Chunked completion log-probs: equal to the plain full-logits version (values, entropy, gradients),
never holding more than one chunk of logits, and micro-batches cut to their own width."""

import pytest
import torch

from grpo.backend.cpu_fast import completion_logprobs
from grpo.backend.plain import completion_logprobs_reference
from grpo.core.logprobs import build_sequences, micro_batch, packed_tokens, plan_micro_batches, prompt_groups
from grpo.models import checkpointed_layers
from grpo.testing import tiny_model


def random_batch(vocab: int, seed: int = 0):
    """3 prompts of unequal lengths (left-padded) x 2 completions of unequal lengths (right-padded)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(4, vocab, (n,), generator=g).tolist() for n in (5, 9, 2)]
    ids = torch.randint(4, vocab, (6, 7), generator=g)  # [N, T]
    lengths = torch.tensor([7, 3, 1, 5, 6, 2])
    mask = torch.arange(7)[None, :] < lengths[:, None]  # [N, T]
    ids[~mask] = 1
    return build_sequences(prompts, ids, mask, pad_id=1), mask


def parameter_grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def loss_and_grads(model, fn, batch, mask, weights):
    """Values of fn and the gradient of a loss that uses both the log-probs and the entropy."""
    model.zero_grad(set_to_none=True)
    lp, ent = fn(model, batch, 0.7, with_entropy=True, entropy_grad=True)
    ((lp * weights + 0.3 * ent * weights.flip(0)) * mask).sum().backward()
    return lp.detach() * mask, ent.detach() * mask, parameter_grads(model)


@pytest.mark.parametrize("chunk", [1, 4, 10_000])
@pytest.mark.parametrize("share_prompts", [True, False])
def test_chunked_equals_reference_values_entropy_and_gradients(chunk, share_prompts):
    model = tiny_model(100, seed=1)
    batch, mask = random_batch(100)
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(2))
    ref = loss_and_grads(model, completion_logprobs_reference, batch, mask, weights)
    chunked = lambda *a, **k: completion_logprobs(*a, **k, chunk_tokens=chunk, share_prompts=share_prompts)  # noqa: E731
    got = loss_and_grads(model, chunked, batch, mask, weights)
    assert ref[2].abs().max() > 1
    for r, c in zip(ref, got):  # values, entropy, gradients (summed in another order: |grad| up to ~13)
        torch.testing.assert_close(c, r, rtol=1e-4, atol=1e-5)


def test_chunked_logprobs_are_zero_at_padding_and_entropy_is_optional():
    model = tiny_model(100)
    batch, mask = random_batch(100)
    with torch.no_grad():
        lp, ent = completion_logprobs(model, batch)
    assert ent is None
    assert (lp[~mask] == 0).all() and (lp[mask] < 0).all()


def test_no_more_than_one_chunk_of_logits_exists_forward_or_backward():
    """The output head only ever sees chunk_tokens rows at a time, also when backward recomputes it."""
    model = tiny_model(100)
    batch, mask = random_batch(100)
    seen = []
    model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(tuple(out.shape)))
    lp, _ = completion_logprobs(model, batch, with_entropy=True, chunk_tokens=4)
    forward_calls = len(seen)
    lp.sum().backward()
    n_tokens = int(mask.sum())
    assert forward_calls == -(-n_tokens // 4)  # only real completion tokens, 4 at a time
    assert len(seen) == 2 * forward_calls  # each chunk recomputed once in backward
    assert max(rows for rows, _ in seen) <= 4


def test_micro_batch_is_cut_to_its_rows_and_gives_the_same_logprobs():
    model = tiny_model(100)
    batch, mask = random_batch(100)
    with torch.no_grad():
        whole, _ = completion_logprobs(model, batch)
        for rows, prompt, completion in [([2, 5], 9, 2), ([5], 2, 2), ([1, 4], 5, 6)]:
            mb = micro_batch(batch, rows)  # prompts of 5, 5, 9, 9, 2, 2 tokens; completions of 7, 3, 1, 5, 6, 2
            part, _ = completion_logprobs(model, mb.sequences)
            assert mb.sequences.completion_len == completion
            assert mb.sequences.input_ids.shape[1] == prompt + completion  # widest prompt + longest completion
            torch.testing.assert_close(part, mb.take(whole), rtol=1e-5, atol=1e-6)
            assert mb.take(mask).shape == (len(rows), completion)


def test_plan_respects_rows_and_token_budget_and_covers_every_row_once():
    lengths = torch.tensor([10, 50, 12, 48, 30, 11, 90])
    plan = plan_micro_batches(lengths, max_rows=3, max_tokens=100)
    assert sorted(i for rows in plan for i in rows) == list(range(7))
    for rows in plan:
        assert len(rows) <= 3
        assert len(rows) == 1 or len(rows) * max(int(lengths[i]) for i in rows) <= 100
    assert [6] in plan  # longer than half the budget: alone
    assert plan_micro_batches(lengths, max_rows=2) == [[1, 6], [3, 4], [2, 5], [0]]  # similar lengths together
    assert plan_micro_batches(lengths, max_rows=8, max_tokens=5) == [[i] for i in (6, 1, 3, 4, 2, 5, 0)]


@pytest.mark.parametrize("seed", range(6))
def test_packed_plan_budgets_each_prompt_once_and_keeps_a_prompt_s_rows_together(seed):
    """Rows run packed: a micro-batch's tokens are its distinct prompts once, each at the widest of them, plus its
    completions' own tokens (counted here by a loop), within the budget unless it is one row; every row once; the
    rows of a prompt in consecutive micro-batches."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))  # noqa: E731
    sizes = [draw(1, 6) for _ in range(draw(1, 5))]
    prompt_of = torch.tensor([p for p, size in enumerate(sizes) for _ in range(size)])
    prompt_of = prompt_of[torch.randperm(len(prompt_of), generator=g)]
    widths = torch.tensor([draw(1, 40) for _ in sizes])
    prompt_len = widths[prompt_of]
    lengths = prompt_len + torch.randint(1, 60, prompt_of.shape, generator=g)
    max_rows, budget = draw(1, 8), draw(30, 300)
    plan = plan_micro_batches(lengths, max_rows, budget, prompts=(prompt_of, prompt_len))
    assert sorted(i for rows in plan for i in rows) == list(range(len(lengths)))
    for rows in plan:
        prompts = {int(prompt_of[i]) for i in rows}
        widest = max(int(prompt_len[i]) for i in rows)
        tokens = len(prompts) * widest + sum(int(lengths[i] - prompt_len[i]) for i in rows)
        assert packed_tokens(lengths, prompt_of, prompt_len, rows) == tokens
        assert len(rows) <= max_rows and (len(rows) == 1 or tokens <= budget)
    for p in range(len(sizes)):  # the micro-batches holding a prompt's rows follow one another
        holding = [k for k, rows in enumerate(plan) if any(int(prompt_of[i]) == p for i in rows)]
        assert holding == list(range(holding[0], holding[-1] + 1))
    everything = plan_micro_batches(lengths, len(lengths), int(lengths.sum()), prompts=(prompt_of, prompt_len))
    assert everything == [list(range(len(lengths)))]  # all fits: one micro-batch


def test_prompt_groups_name_each_row_s_prompt_and_its_tokens():
    seqs = build_sequences([[5, 6, 7], [8], [5, 6, 7]], torch.tensor([[9], [10], [11], [12], [13], [14]]),
                           torch.ones(6, 1, dtype=torch.bool), pad_id=0)
    prompt_of, prompt_len = prompt_groups(seqs)
    assert prompt_len.tolist() == [3, 3, 1, 1, 3, 3]
    assert prompt_of[0] == prompt_of[1] == prompt_of[4] == prompt_of[5] != prompt_of[2] == prompt_of[3]


def test_gradient_checkpointing_gives_the_same_gradients_and_recomputes_layers():
    model = tiny_model(100, seed=3)
    batch, mask = random_batch(100)
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(4))
    plain = loss_and_grads(model, completion_logprobs, batch, mask, weights)
    calls = []
    # a pre-hook: torch stops a recompute as soon as the saved tensors are back, before mlp returns
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    with checkpointed_layers(model):
        again = loss_and_grads(model, completion_logprobs, batch, mask, weights)
    assert len(calls) == 2  # forward, and the recompute in backward
    assert not model.model.layers[0].training and not model.model.layers[0].mlp.training  # back to eval
    for a, b in zip(plain, again):  # plain: each prompt once; checkpointed: the plain forward
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def embedded_shapes(model, batch, **kwargs):
    """Shapes of the token ids the model embeds during one log-prob pass."""
    shapes = []
    handle = model.model.embed_tokens.register_forward_hook(lambda mod, args, out: shapes.append(tuple(args[0].shape)))
    with torch.no_grad():
        completion_logprobs(model, batch, **kwargs)
    handle.remove()
    return shapes


def test_each_prompt_runs_once_for_its_group():
    """3 prompts (widest 9 tokens) x 2 completions (7, 3, 1, 5, 6, 2 tokens): packed into one sequence of 3 * 9 + 24
    tokens (the completions' padding left out); through the KV cache (attention other than sdpa) the prompts once,
    then the completions, padded to the longest."""
    model = tiny_model(100)
    batch, _ = random_batch(100)
    assert embedded_shapes(model, batch) == [(1, 3 * 9 + 24)]
    assert embedded_shapes(model, batch, share_prompts=False) == [(6, 16)]
    model.set_attn_implementation("eager")
    assert embedded_shapes(model, batch) == [(3, 9), (6, 7)]


def test_sliding_window_models_take_the_plain_forward():
    model = tiny_model(100)
    batch, mask = random_batch(100)
    model.config.layer_types = ["sliding_attention", "full_attention"]
    assert embedded_shapes(model, batch) == [(6, 16)]


@pytest.mark.slow
def test_default_model_chunked_shared_logprobs_equal_the_plain_ones():
    """On the real SmolLM2-135M (tied 49k-token head, its chat template): the lean path equals the plain one."""
    from grpo.config import load_config
    from grpo.models import encode_prompt, load_model_and_tokenizer

    cfg = load_config(None, ["model.device=cpu", "model.threads=2"])
    model, tok, _ = load_model_and_tokenizer(cfg.model, log=lambda *_: None)
    prompts = [encode_prompt(tok, [{"role": "user", "content": q}]) for q in ("What is 2 + 3?", "Name a colour.")]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40_000, (4, 9), generator=g)
    mask = torch.arange(9)[None, :] < torch.tensor([9, 4, 6, 2])[:, None]
    batch = build_sequences(prompts, ids, mask, pad_id=tok.pad_token_id)
    with torch.no_grad():
        plain, plain_entropy = completion_logprobs_reference(model, batch, 0.7, with_entropy=True)
        lean, lean_entropy = completion_logprobs(model, batch, 0.7, with_entropy=True, chunk_tokens=7)
    torch.testing.assert_close(lean, plain * mask, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lean_entropy, plain_entropy * mask, rtol=1e-4, atol=1e-4)


def test_models_with_transformed_logits_take_the_plain_path_zeroed_at_padding():
    model = tiny_model(100)
    batch, mask = random_batch(100)
    model.config.final_logit_softcapping = 30.0  # what Gemma 2 sets: logits are more than head(hidden)
    with torch.no_grad():
        lp, ent = completion_logprobs(model, batch, with_entropy=True)
        plain, plain_ent = completion_logprobs_reference(model, batch, with_entropy=True)
    assert (lp[~mask] == 0).all() and (ent[~mask] == 0).all()
    torch.testing.assert_close(lp, plain * mask, rtol=0, atol=0)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_fused_head_equals_log_softmax_with_a_bias_temperature_and_entropy_gradient(chunk):
    """The head function on its own: values and the gradients of hidden, weight and bias, against
    log_softmax over the full logits."""
    from grpo.backend.lean import _HeadLogprobs

    g = torch.Generator().manual_seed(4)
    head = torch.nn.Linear(16, 50)
    hidden = torch.randn(11, 16, generator=g, requires_grad=True)  # [K, H]
    targets = torch.randint(0, 50, (11,), generator=g)
    w_lp, w_ent = torch.randn(11, generator=g), torch.randn(11, generator=g)
    params = [hidden, head.weight, head.bias]

    lp, ent = _HeadLogprobs.apply(hidden, head.weight, head.bias, head, targets, 0.7, chunk, True, True)
    ours = torch.autograd.grad((lp * w_lp + ent * w_ent).sum(), params)
    logp = torch.log_softmax(head(hidden) / 0.7, dim=-1)  # [K, V]
    plain_lp, plain_ent = logp.gather(1, targets[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)
    plain = torch.autograd.grad((plain_lp * w_lp + plain_ent * w_ent).sum(), params, retain_graph=True)
    torch.testing.assert_close(lp, plain_lp)
    torch.testing.assert_close(ent, plain_ent)
    for a, e in zip(ours, plain):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)

    lp, ent = _HeadLogprobs.apply(hidden, head.weight, head.bias, head, targets, 0.7, chunk, True, False)
    assert not ent.requires_grad  # the entropy as a metric: no gradient through it
    ours = torch.autograd.grad((lp * w_lp).sum(), params)
    plain = torch.autograd.grad((plain_lp * w_lp).sum(), params)
    for a, e in zip(ours, plain):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


# -- the plain backend: the same lean path, through the model's own forward --------------------------------


def plain_logprobs(chunk: int = 256):
    from grpo.backend import PlainBackend

    backend = PlainBackend(torch.device("cpu"), chunk_tokens=chunk)
    return lambda model, batch, temperature=1.0, **k: backend.logprobs(model, batch, temperature, **k)


def test_the_plain_backend_never_holds_more_than_one_chunk_of_logits():
    """What the output head returns, forward and backward: chunks of real completion tokens, never the
    [rows, T, V] logits (before: the model's forward gave [6, 8, 100])."""
    model = tiny_model(100)
    batch, mask = random_batch(100)
    seen = []
    model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(tuple(out.shape)))
    lp, ent = plain_logprobs(chunk=4)(model, batch, with_entropy=True, entropy_grad=True)
    forward_calls = len(seen)
    (lp.sum() + ent.sum()).backward()
    assert forward_calls == -(-int(mask.sum()) // 4)  # only the real completion tokens, 4 at a time
    assert len(seen) == 2 * forward_calls and max(rows for rows, _ in seen) <= 4
    assert model.lm_head.weight.grad is not None and model.get_output_embeddings() is model.lm_head  # put back


def test_the_plain_backend_runs_each_prompt_once_for_its_group():
    model = tiny_model(100)
    batch, _ = random_batch(100)
    shapes = []
    model.model.embed_tokens.register_forward_hook(lambda mod, args, out: shapes.append(tuple(args[0].shape)))
    lp, _ = plain_logprobs()(model, batch)
    assert shapes == [(1, 3 * 9 + 24)]  # before: [(6, 16)], every row's prompt and padding
    assert model.get_decoder() is model.model


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_plain_backend_equals_the_full_logits_reference(seed, tied, checkpointing):
    """Randomized: mixed-length rows (prompts and completions), temperature 0.7, a loss over the log-probs and
    the entropy (its gradient too); values, entropy and every parameter's gradient."""
    model = tiny_model(100, seed=seed, tied=tied)
    batch, mask = random_batch(100, seed=seed)
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(seed + 7))
    ref = loss_and_grads(model, completion_logprobs_reference, batch, mask, weights)
    with checkpointed_layers(model, checkpointing):
        got = loss_and_grads(model, plain_logprobs(chunk=5), batch, mask, weights)
    assert float(ref[2].abs().max()) > 1
    for r, c in zip(ref, got):
        torch.testing.assert_close(c, r, rtol=1e-4, atol=1e-5)


def test_the_plain_backend_equals_the_reference_with_lora():
    """A peft model (adapters on every Linear of the decoder, the head left whole): the adapters' gradients."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(100, seed=5), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                               init_lora_weights=False))
    batch, mask = random_batch(100, seed=3)
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(8))
    ref = loss_and_grads(model, completion_logprobs_reference, batch, mask, weights)
    got = loss_and_grads(model, plain_logprobs(chunk=3), batch, mask, weights)
    assert ref[2].numel() == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    for r, c in zip(ref, got):
        torch.testing.assert_close(c, r, rtol=1e-4, atol=1e-5)


def test_the_head_s_backward_recomputes_under_the_forward_s_autocast():
    """On a CPU under bfloat16 autocast, the chunks recomputed in the backward pass are bfloat16 logits as in
    the forward (before: the autocast state was restored on CUDA only, so the CPU recomputed in float32)."""
    from grpo.backend.lean import _HeadLogprobs

    head = torch.nn.Linear(16, 50)
    hidden = torch.randn(6, 16, requires_grad=True)
    dtypes = []
    head.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", torch.bfloat16):
        lp, _ = _HeadLogprobs.apply(hidden, head.weight, head.bias, head, torch.arange(6), 1.0, 4, False, False)
    lp.sum().backward()
    assert dtypes == [torch.bfloat16] * 4
