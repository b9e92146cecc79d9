"""Multi-turn episodes (grpo.envs.episodes): token in, token out, masks and normalizers, limits, errors.

The environment here is duck-typed (no grpo.envs.base import), so the runner is tested on its contract alone."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from grpo.envs.chat import continuation_ids
from grpo.envs.episodes import EnvironmentFailure, EpisodeLimits, run_episodes
from grpo.rollout import FastEngine, HFGenerateEngine
from grpo.rollout.base import SamplingParams, group_seed
from grpo.testing import tiny_model, tiny_tokenizer
from rollout_helpers import peaky, reference_logprobs

VOCAB = 160  # ids past the printable characters decode to "<tN>", which encodes back to other ids: no round trip


class Chatty:
    """Answers every turn with the length of the model's text; done after `turns` turns (a reward each turn)."""

    stop = ("1", "5")  # the tiny model's "<t1NN>" tokens end its turns (it rarely samples the EOS)
    prompt_column, system_prompt = "prompt", None

    def __init__(self, turns: int = 3, fail_at: int | None = None):
        self.turns, self.fail_at, self.seen = turns, fail_at, 0

    def bind(self, tokenizer) -> None:
        pass

    def template_tools(self, tokenizer):
        return None

    def reset(self, row: dict, seed: int) -> list[dict]:
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, text: str):
        self.seen += 1
        if self.fail_at == self.seen:
            raise RuntimeError("boom")
        reply = "#" * (1 + self.seen * 2 + len(text) % 4)  # environment messages of different lengths per row
        return SimpleNamespace(messages=[{"role": "user", "content": reply}], reward=float(len(text) % 3),
                               done=self.seen >= self.turns, tool_calls=1, tool_errors=int(len(text) % 2))


ROWS = [{"prompt": "hi"}, {"prompt": "a longer first prompt"}]


def setup(engine_kind: str = "fast"):
    tok = tiny_tokenizer(VOCAB)
    model = peaky(tiny_model(VOCAB, seed=3))
    engine = FastEngine(model, tok) if engine_kind == "fast" else HFGenerateEngine(model, tok)
    return model, tok, engine


def play(engine, tok, make_env=Chatty, g=3, max_new=6, max_turns=4, max_tokens=None, on_error="raise", greedy=False):
    params = SamplingParams(max_new_tokens=max_new, temperature=0.0 if greedy else 1.0)
    seeds = None if greedy else [group_seed(7, b) for b in range(len(ROWS))]
    return run_episodes(engine, tok, ROWS, make_env, g, params, seeds,
                        EpisodeLimits(max_turns, max_tokens, on_error, concurrency=4), name="chatty")


@pytest.mark.parametrize("engine_kind", ["fast", "hf"])
def test_model_tokens_are_kept_as_sampled_and_their_logprobs_are_the_policy_s(engine_kind):
    """The rollout holds the sampled ids themselves (never decoded and encoded again), the environment's tokens in
    between are the template's continuation, and the policy's log-probs recomputed over the rollout's sequence equal
    the sampler's at every model token: the model was conditioned on exactly this transcript."""
    model, tok, engine = setup(engine_kind)
    r = play(engine, tok)
    assert r.action_mask is not None and r.episodes is not None
    untripped = 0
    for n in range(r.num_completions):
        length = int(r.completion_mask[n].sum())
        ids, action = r.completion_ids[n, :length].tolist(), r.action_mask[n, :length].tolist()
        ep = r.episodes[n]
        assert ep.turns >= 1 and all(action[t] for t in ep.turn_ends) and action[length - 1]
        # between two model turns: exactly the template's continuation for the environment's message
        for k, end in enumerate(ep.turn_ends[:-1]):
            nxt = next(j for j in range(end + 1, length) if action[j])  # the next turn's first token
            reply = ep.messages[ep.first_messages + 2 * k + 1]
            assert ids[end + 1: nxt] == continuation_ids(tok, [reply], ids[end]), (n, k)
        text = tok.decode(ids, skip_special_tokens=True)
        untripped += tok(text, add_special_tokens=False).input_ids != [i for i in ids if i not in tok.all_special_ids]
        ref = reference_logprobs(model, r.prompt_ids[n // r.group_size], ids)
        model_tokens = torch.tensor(action)
        assert torch.allclose(ref[model_tokens], r.sampling_logprobs[n, :length][model_tokens], atol=1e-4)
        assert (r.sampling_logprobs[n, :length][~model_tokens] == 0).all()
    assert sum(ep.turns for ep in r.episodes) >= 2 * r.num_completions  # several turns really played
    assert untripped > 0  # the test's tokenizer does not round-trip these transcripts: rebuilding from text would drift
    assert r.lengths.tolist() == r.action_mask.sum(1).tolist()  # lengths count the model's tokens only


def test_episodes_reproduce_and_do_not_depend_on_the_engine_batch():
    """The same seeds give the same episodes; a row's episodes do not depend on the other rows in the batch."""
    _, tok, engine = setup()
    a, b = play(engine, tok), play(engine, tok)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.action_mask, b.action_mask)


def test_limits_truncate_episodes():
    _, tok, engine = setup()
    r = play(engine, tok, make_env=lambda: Chatty(turns=99), max_turns=2)  # never done: cut by max_turns
    assert r.truncated.all() and all(ep.turns <= 2 for ep in r.episodes)
    r = play(engine, tok, make_env=lambda: Chatty(turns=99), max_turns=9, max_tokens=40)
    for n in range(r.num_completions):
        assert len(r.prompt_ids[n // 3]) + int(r.completion_mask[n].sum()) <= 40
        assert r.truncated[n] and r.episodes[n].truncated


def test_an_environment_that_raises_names_the_environment_row_and_turn():
    _, tok, engine = setup()
    with pytest.raises(EnvironmentFailure, match=r"environment chatty raised at row \d .*turn 2.*boom"):
        play(engine, tok, make_env=lambda: Chatty(fail_at=2))
    r = play(engine, tok, make_env=lambda: Chatty(fail_at=2), on_error="none")
    assert all(ep.error and "boom" in ep.error and ep.turns == 2 for ep in r.episodes)


def test_episodes_of_a_group_must_start_alike():
    class Different(Chatty):
        count = 0

        def reset(self, row, seed):
            Different.count += 1
            return [{"role": "user", "content": f"{row['prompt']} {Different.count}"}]

    _, tok, engine = setup()
    with pytest.raises(EnvironmentFailure, match="same state"):
        play(engine, tok, make_env=Different)


def test_turn_rewards_land_between_their_turn_and_the_next():
    """Process advantages: each turn's environment reward is a step that lands at or after the turn's last token and
    before the next turn's first (the final turn's on the last token), so it reaches exactly the turns up to it."""
    from grpo.rewards import Reward, get_reward, score
    from grpo.rewards.process import step_table
    from grpo.sample import episode_columns

    _, tok, engine = setup()
    r = play(engine, tok)
    columns = episode_columns(r, tok)
    texts = tok.batch_decode(r.completion_ids, skip_special_tokens=True)
    result = score([Reward("environment", get_reward("environment"), 1.0, {"per_turn": True})], [""] * len(texts),
                   texts, columns)
    values, rows, index = step_table(result.steps, result.per_function, {"environment": 1.0}, r.completion_ids,
                                     r.spans, tok)
    placed = 0
    for n, ep in enumerate(r.episodes):
        action, span = r.action_mask[n].tolist(), int(r.spans[n])
        mine = [(float(v), int(t)) for v, row, t in zip(values, rows, index) if int(row) == n]
        rewarded = [(k, x) for k, x in enumerate(ep.turn_rewards) if x is not None]
        assert [v for v, _ in mine] == [x for _, x in rewarded]
        for (k, _), (_, t) in zip(rewarded, mine):
            end = ep.turn_ends[k]
            nxt = next((j for j in range(end + 1, span) if action[j]), span)  # the next turn's first token
            assert end <= t < nxt or (nxt == span and t == span - 1), (n, k, t, end, nxt)
            placed += 1
    assert placed >= r.num_completions


def test_async_environments_are_awaited():
    class Async(Chatty):
        async def step(self, text):
            return Chatty.step(self, text)

    _, tok, engine = setup()
    r = play(engine, tok, make_env=Async)
    assert sum(ep.turns for ep in r.episodes) >= 2 * r.num_completions and all(ep.error is None for ep in r.episodes)


def test_a_prompt_that_fills_max_tokens_plays_no_turn_and_says_so(caplog, monkeypatch):
    """An episode whose first messages already fill environment.max_tokens cannot play a turn: it is empty
    and truncated (the run goes on), and a warning names the row and the limit, not a silent empty run."""
    import grpo.envs.episodes as episodes

    monkeypatch.setattr(episodes, "_warned_full_prompts", False)
    _, tok, engine = setup()
    with caplog.at_level("WARNING", logger="grpo.envs.episodes"):
        r = play(engine, tok, max_tokens=10)
    assert all(ep.turns == 0 and ep.truncated for ep in r.episodes) and r.truncated.all()
    assert int(r.completion_mask.sum()) == 0
    assert "environment.max_tokens=10 leaves the model no room for a turn" in caplog.text
