"""FastSession (the fast engine's multi-turn session, KV caches extended) against TranscriptSession (each turn
re-prefills the transcript) over the same FastEngine: the same tokens every turn, log-probs to 1e-4."""

from __future__ import annotations

import pytest
import torch
from rollout_helpers import peaky

from grpo.rollout import FastEngine, SamplingParams
from grpo.rollout import engine as engine_module
from grpo.rollout.fast_session import FastSession, chunk_mask, compaction
from grpo.rollout.session import TranscriptSession
from grpo.testing import tiny_model, tiny_tokenizer

# unequal lengths (left padding), B = 4
TEXTS = ["hello there", "2+2=", "What is the answer to this one?", "ok"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok(t, add_special_tokens=False).input_ids for t in TEXTS]


def engine_for(tok, fused: bool | None, eos_chars: str = "aeiou", device: str = "cpu") -> FastEngine:
    """FastEngine over a two-layer Llama whose EOS tokens include `eos_chars` (turns end at different steps)."""
    model = peaky(tiny_model(len(tok), seed=3), seed=3).to(device)  # large weights: outputs vary, log-probs too
    model.generation_config.eos_token_id = [3, *tok.convert_tokens_to_ids(list(eos_chars))]
    engine = FastEngine(model, tok, fused=fused)
    assert ("fused decode steps" in engine.describe()) == (device == "cpu" and fused is not False)
    return engine


def play(engine, prompts, G, seeds, params, turns, limit_of, env_of, continues):
    """Run both sessions over `turns` turns with the same calls; assert each turn's samples are equal.

    limit_of(row, turn) -> the row's token limit; env_of(row, turn) -> the environment's tokens after the turn
    (appended, maybe in two extend calls); continues(row, turn) -> whether the episode has another turn.
    Returns the fast session and every turn's samples."""
    fast, reference = engine.episodes(prompts, G, seeds), TranscriptSession(engine, prompts, G, seeds)
    assert isinstance(fast, FastSession)
    rows, history = list(range(len(prompts) * G)), []
    for turn in range(turns):
        limits = [limit_of(r, turn) for r in rows]
        got, expected = fast.sample(rows, params, limits), reference.sample(rows, params, limits)
        for r, a, b in zip(rows, got, expected):
            assert a.ids == b.ids, f"turn {turn}, row {r}"
            assert a.stopped == b.stopped, f"turn {turn}, row {r}"
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-4)
        history.append(dict(zip(rows, got)))
        rows = [r for r in rows if continues(r, turn)]
        tokens = [env_of(r, turn) for r in rows]
        split = [len(t) // 2 for t in tokens]  # two extend calls: the chunk is run at the next turn, whole
        for session in (fast, reference):
            session.extend(rows, [t[:k] for t, k in zip(tokens, split)])
            session.extend(rows, [t[k:] for t, k in zip(tokens, split)])
    return fast, history


def env_tokens(tok, row: int, turn: int) -> list[int]:
    """1..9 tokens, a different count per row and turn."""
    text = "<tool> result = 42\n"
    return tok(text[: 1 + (row * 5 + turn * 3) % 9], add_special_tokens=False).input_ids


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(
    "params",
    [SamplingParams(max_new_tokens=10), SamplingParams(max_new_tokens=10, temperature=0.7, top_p=0.9),
     SamplingParams(max_new_tokens=10, temperature=0.0)],
    ids=["sampled", "top_p", "greedy"],
)
def test_fast_session_samples_what_the_transcript_session_samples(tok, prompts, fused, params):
    """Mixed prompt lengths, G = 3, 4 turns; per-row limits under max_new_tokens; EOS ends turns at different
    steps (its rows leave the decode batch and keep their caches); environment chunks of 1-9 tokens; episodes
    end along the way, so later turns run a subset of the rows."""
    engine = engine_for(tok, fused)
    seeds = None if params.greedy else [11, 12, 13, 14]
    fast, history = play(
        engine, prompts, 3, seeds, params, turns=4,
        limit_of=lambda r, t: 10 if (r + t) % 3 == 0 else 2 + (r + 2 * t) % 7,
        env_of=lambda r, t: env_tokens(tok, r, t),
        continues=lambda r, t: (r * 7 + t) % 5 != 0,
    )
    samples = [s for turn in history for s in turn.values()]
    assert len(history[-1]) < len(history[0]) == 12  # episodes ended along the way
    assert any(s.stopped for s in samples) and any(not s.stopped for s in samples)
    assert len({len(s.ids) for s in history[0].values()}) >= 3  # the first turn's rows ended apart
    fast.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_on_a_gpu_through_the_models_forward(tok, prompts):
    """On a CUDA device the engine decodes through the model's forward (its default there)."""
    engine = engine_for(tok, fused=None, device="cuda")
    play(engine, prompts, 3, [11, 12, 13, 14], SamplingParams(max_new_tokens=10), turns=3,
         limit_of=lambda r, t: 3 + (r + t) % 8, env_of=lambda r, t: env_tokens(tok, r, t),
         continues=lambda r, t: (r + t) % 4 != 0)


class LateStops(engine_module._StopStrings):
    """Reports a stop string one step after it appears (as a tokenizer whose decoded tail lags behind the whole
    text would): the turn's end is then cut back to it (exact_ends), after one token too many was decoded."""

    def __init__(self, *args):
        super().__init__(*args)
        self.seen: set[int] = set()

    def check(self, rows, tokens, device):
        found = super().check(rows, tokens, device).tolist()
        late = [r in self.seen for r in rows]
        self.seen |= {r for r, f in zip(rows, found) if f}
        return torch.tensor(late, dtype=torch.bool, device=device)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("late", [False, True], ids=["", "cut_back"])
def test_stop_strings_end_turns_as_in_the_transcript_session(tok, prompts, fused, late, monkeypatch):
    """A turn ends at a stop string, kept; where it was seen a step late, the extra token fed is dropped from the
    episode's cache (it would otherwise condition its next turns)."""
    if late:
        monkeypatch.setattr(engine_module, "_StopStrings", LateStops)
    engine = engine_for(tok, fused, eos_chars="")
    params = SamplingParams(max_new_tokens=12, stop=("e", "t", "9", "ab"))
    _, history = play(
        engine, prompts, 3, [3, 4, 5, 6], params, turns=3,
        limit_of=lambda r, t: 12 - (r % 4), env_of=lambda r, t: env_tokens(tok, r, t),
        continues=lambda r, t: r % 4 != 1,
    )
    by_stop = [s for turn in history for s in turn.values() if s.stopped]
    ends = [tok.convert_ids_to_tokens(s.ids[-1]) for s in by_stop]  # the last token: EOS or a stop string's end
    assert all(e == "<|im_end|>" or any(x in e for x in "et9b") for e in ends), ends  # "<|im_start|>" has a "t"
    assert sum(e != "<|im_end|>" for e in ends) >= 3


@pytest.mark.parametrize("fused", [True, False])
def test_a_live_episode_holds_its_own_tokens_and_bounded_padding(tok, prompts, fused):
    """One episode runs far longer than the others for two turns, then ends: at the next turns the cache shrinks
    to the live episodes' own tokens (plus padding to the longest of them, and this turn's), and stays bounded
    over many turns; each row's unmasked positions are exactly its tokens."""
    engine = engine_for(tok, fused, eos_chars="")
    G = 2
    session = engine.episodes(prompts[:2], G, [2, 3])  # seeds under which episode 0 runs to its limits
    params = SamplingParams(max_new_tokens=60)
    fed = {r: len(prompts[r // G]) for r in range(4)}  # each episode's tokens in the cache (prompt included)
    queued = {r: 0 for r in range(4)}  # run at the episode's next turn: its last token and the environment's
    rows = list(range(4))
    for turn in range(8):
        limits = [60 if r == 0 else 3 for r in rows]
        samples = session.sample(rows, params, limits)
        for r, s in zip(rows, samples):
            fed[r] += queued[r] + len(s.ids) - 1
        length = session.cache.length
        held = (session.bias[: len(rows), :length] == 0).sum(1).tolist()  # [R] positions each row attends
        own = [fed[r] - (len(prompts[r // G]) if fused else 0) for r in session.order.tolist()]
        assert held == own  # its own tokens (the fused decoder reads the prompts from their group's cache)
        if turn == 1:  # episode 0 has ~120 tokens: every row is padded to it
            assert length >= 110
        if turn >= 2:  # episode 0 has ended: the others hold a few tokens each
            assert 0 not in session.order.tolist()
            assert length <= max(own) + 5 + 3  # padding: to the longest live row, this turn's chunk and holes
            assert session.cache.capacity <= length + session.cache.BLOCK
        rows = rows if turn < 1 else [1, 2, 3]
        chunks = [[5, 6, 7, 8] if r % 2 else [9] for r in rows]
        session.extend(rows, chunks)
        for r, chunk in zip(rows, chunks):
            queued[r] = 1 + len(chunk)
    session.close()


def test_the_model_runs_only_new_tokens_after_the_prompts(tok, prompts):
    """Through the model's forward (fused=False) every call after the prefill runs at most one token per row
    more than the longest environment chunk: no transcript is prefilled again."""
    engine = engine_for(tok, fused=False)
    widths = []
    hook = engine.runner.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        session = engine.episodes(prompts, 2, [1, 2, 3, 4])
        prefill = list(widths)
        rows = list(range(8))
        for turn in range(3):
            session.sample(rows, SamplingParams(max_new_tokens=8), [8] * len(rows))
            session.extend(rows, [env_tokens(tok, r, turn) for r in rows])
    finally:
        hook.remove()
    assert prefill == [max(len(p) for p in prompts)]
    assert 1 < max(widths[1:]) <= 1 + 9


def test_compaction_and_chunk_mask():
    valid = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    positions, counts = compaction(valid)
    assert counts.tolist() == [3, 1, 5]
    assert positions[0, :3].tolist() == [0, 2, 3] and positions[1, :1].tolist() == [4]
    assert positions[2].tolist() == [0, 1, 2, 3, 4]
    neg = torch.finfo(torch.float32).min
    row_bias = torch.tensor([[0.0, neg], [0.0, 0.0]])
    real = torch.tensor([[False, True, True], [True, True, True]])
    mask = chunk_mask(row_bias, real)  # [2, 1, 3, 5]
    sees = (mask[:, 0] == 0).int().tolist()
    assert sees[0] == [[1, 0, 0, 0, 0], [1, 0, 0, 1, 0], [1, 0, 0, 1, 1]]  # chunk 0 is padding
    assert sees[1] == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
