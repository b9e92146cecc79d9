"""Multi-turn episodes, token in, token out: the model's turns come from an engine's EpisodeSession
(grpo.rollout.base), the environment's answers are appended as tokens (grpo.envs.chat), and the result is one
`Rollout` whose completion is every turn after the prompt and whose `action_mask` marks the model's tokens.

One batch of B rows x G episodes runs turn by turn:
    reset every environment (the G episodes of a row start from the same messages, so share one prompt)
    repeat up to max_turns times:
        the live episodes' model turns, sampled in one batch      (session.sample)
        the environments' steps for those turns, concurrently     (threads)
        the environments' messages as tokens, appended            (session.extend)
An episode ends when its environment says done, or it is truncated: its turn hit sampling.max_new_tokens without
ending, the transcript reached environment.max_tokens, or it used environment.max_turns turns without ending.
The model's tokens are never decoded and encoded again: their text is only what the environment reads.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import torch

from grpo.envs.chat import continuation_ids
from grpo.models import encode_prompt
from grpo.rollout.base import Rollout, SamplingParams

_log = logging.getLogger(__name__)
_warned_full_prompts = False


def environment_class(cfg) -> tuple[type, dict]:
    """The environment class of an `environment` section (grpo.config.EnvironmentConfig) and its constructor's
    arguments, the tools loaded; ValueError naming the field when the class, a tool or an argument is wrong."""
    from grpo.envs import ToolEnvironment, check_environment_args, load_environment, load_tools

    cls = load_environment(cfg.name) if cfg.name else ToolEnvironment
    args = dict(cfg.args)
    if "tools" in args:
        raise ValueError("environment.args: tools are named in environment.tools (path/to/file.py:function), not in args")
    if cfg.tools:
        if "tools" not in inspect.signature(cls).parameters:
            raise ValueError(f"environment.tools: environment {cfg.name!r} takes no tools; give tools to the default "
                             "tool environment (environment.name unset) or to a ToolEnvironment subclass")
        args["tools"] = load_tools(cfg.tools)
    check_environment_args(cls, args)
    return cls, args


@dataclass
class Episodes:
    """How a run plays episodes: a fresh environment per episode, and the limits."""

    make_env: object  # () -> Environment, ready for reset
    limits: "EpisodeLimits"
    name: str

    @classmethod
    def from_config(cls, config, tokenizer) -> "Episodes | None":
        """The episodes of a run's config (grpo.config.Config), None when it has no environment."""
        env = config.environment
        if not env.enabled:
            return None
        env_cls, args = environment_class(env)
        data = config.data

        def make():
            instance = env_cls(**args)
            instance.prompt_column, instance.system_prompt = data.prompt_column, data.system_prompt
            instance.bind(tokenizer)
            return instance

        make().template_tools(tokenizer)  # a tool format the template cannot serve fails here, before sampling
        limits = EpisodeLimits(env.max_turns, env.max_tokens, env.on_error, env.concurrency)
        return cls(make, limits, env.name or "tools")

    def run(self, engine, tokenizer, rows: list[dict], group_size: int, params: SamplingParams,
            seeds: list[int] | None) -> Rollout:
        return run_episodes(engine, tokenizer, rows, self.make_env, group_size, params, seeds, self.limits, self.name)


class EnvironmentFailure(RuntimeError):
    """An environment raised, with environment.on_error = raise: names the environment, the row and the turn."""


@dataclass
class Episode:
    """What happened in one episode, for rewards, samples, the report and evaluation."""

    messages: list[dict]  # the whole conversation: the first messages, each model turn (role "assistant", its
    # text), and the environment's messages after it
    turn_ends: list[int] = field(default_factory=list)  # completion token index of each model turn's last token
    turn_rewards: list[float | None] = field(default_factory=list)  # the environment's reward for each turn
    tool_calls: int = 0
    tool_errors: int = 0
    truncated: bool = False  # cut by a limit (max_new_tokens, max_tokens, max_turns) instead of ending
    error: str | None = None  # what the environment raised (environment.on_error = none)
    seconds: float = 0.0  # time spent in the environment's reset and steps
    first_messages: int = 0  # how many of `messages` came before the first model turn (the prompt)

    @property
    def turns(self) -> int:
        return len(self.turn_ends)

    def to_dict(self) -> dict:
        return {"messages": self.messages, "first_messages": self.first_messages, "turn_rewards": self.turn_rewards,
                "tool_calls": self.tool_calls, "tool_errors": self.tool_errors, "truncated": self.truncated,
                "error": self.error}


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int  # model turns per episode
    max_tokens: int | None  # prompt + every turn, model's and environment's (None: no limit)
    on_error: str = "raise"  # "raise" | "none"
    concurrency: int = 8  # environment steps run at once (threads)


@dataclass
class _Live:
    """One episode while it runs."""

    env: object
    row: int  # b: its dataset row in the batch
    prompt_len: int
    ids: list[int] = field(default_factory=list)  # completion tokens so far
    action: list[bool] = field(default_factory=list)  # which are the model's
    logprobs: list[float] = field(default_factory=list)
    done: bool = False


def run_episodes(engine, tokenizer, rows: list[dict], make_env, group_size: int, params: SamplingParams,
                 seeds: list[int] | None, limits: EpisodeLimits, name: str = "environment") -> Rollout:
    """G episodes of `make_env()` for each of `rows` (group b under seeds[b]; None: greedy); the Rollout of all
    N = B * G, row n = b * G + g, with `action_mask` and `episodes` set."""
    g, n = group_size, len(rows) * group_size
    envs = [make_env() for _ in range(n)]
    episodes = [Episode(messages=[]) for _ in range(n)]
    env_seeds = [seeds[b] if seeds is not None else b for b in range(len(rows))]
    firsts = _step_all(envs, lambda i, env: env.reset(rows[i // g], env_seeds[i // g]), episodes, range(n),
                       limits, name, rows, g, turn=None)
    prompt_ids = []
    for b in range(len(rows)):
        group = [firsts[b * g + k] for k in range(g)]
        if any(m != group[0] for m in group):
            raise EnvironmentFailure(f"environment {name}: reset gave different first messages to the {g} episodes "
                                     f"of row {b}; the episodes of a group must start from the same state")
        prompt_ids.append(encode_prompt(tokenizer, group[0], tools=envs[b * g].template_tools(tokenizer)))
        if limits.max_tokens is not None and len(prompt_ids[-1]) >= limits.max_tokens:
            _warn_full_prompt(name, b, len(prompt_ids[-1]), limits.max_tokens)
    for i, ep in enumerate(episodes):
        ep.messages, ep.first_messages = list(firsts[i]), len(firsts[i])
    live = [_Live(env, i // g, len(prompt_ids[i // g])) for i, env in enumerate(envs)]
    stop = tuple(dict.fromkeys(params.stop + tuple(s for env in envs[:: g] for s in getattr(env, "stop", ()))))
    turn_params = replace(params, stop=stop)
    session = engine.episodes(prompt_ids, g, seeds)
    try:
        for turn in range(limits.max_turns):
            running = [i for i in range(n) if not live[i].done]
            if not running:
                break
            _play_turn(session, tokenizer, live, episodes, running, turn, turn_params, limits, name, rows, g)
    finally:
        session.close()
    for i in range(n):
        if not live[i].done:  # still going after max_turns
            episodes[i].truncated = True
    return _rollout(prompt_ids, live, episodes, g, tokenizer)


def _play_turn(session, tokenizer, live, episodes, running, turn, params, limits, name, rows, g) -> None:
    """One model turn of the `running` episodes, their environments' steps, and their answers appended."""
    room = [params.max_new_tokens if limits.max_tokens is None
            else min(params.max_new_tokens, limits.max_tokens - live[i].prompt_len - len(live[i].ids))
            for i in running]
    for i, r in zip(running, room):
        if r <= 0:
            live[i].done, episodes[i].truncated = True, True
    running = [i for i, r in zip(running, room) if r > 0]
    room = [r for r in room if r > 0]
    samples = session.sample(running, params, room)
    texts = tokenizer.batch_decode([s.ids for s in samples], skip_special_tokens=True)
    stepping = []
    for i, sample, text in zip(running, samples, texts):
        ep, state = episodes[i], live[i]
        state.ids += sample.ids
        state.action += [True] * len(sample.ids)
        state.logprobs += sample.logprobs
        ep.turn_ends.append(len(state.ids) - 1)
        ep.turn_rewards.append(None)
        ep.messages.append({"role": "assistant", "content": text})
        if sample.stopped:
            stepping.append(i)
        else:  # the turn hit its token limit: the episode is cut here
            state.done, ep.truncated = True, True
    text_of = dict(zip(running, texts))
    steps = _step_all([live[i].env for i in stepping], lambda k, env: env.step(text_of[stepping[k]]),
                      [episodes[i] for i in stepping], range(len(stepping)), limits, name, rows, g, turn,
                      rows_of=[live[i].row for i in stepping])
    extend_rows, extend_ids = [], []
    for i, step in zip(stepping, steps):
        ep, state = episodes[i], live[i]
        if step is None:  # the environment raised (on_error: none): the episode ends, unscored
            state.done = True
            continue
        ep.turn_rewards[-1] = None if step.reward is None else float(step.reward)
        ep.tool_calls += int(step.tool_calls)
        ep.tool_errors += int(step.tool_errors)
        ep.messages += list(step.messages)
        if step.done:
            state.done = True
            continue
        if turn == limits.max_turns - 1:  # no turn left to answer in
            state.done, ep.truncated = True, True
            continue
        ids = continuation_ids(tokenizer, step.messages, state.ids[-1] if state.ids else None,
                               tools=state.env.template_tools(tokenizer))
        if limits.max_tokens is not None and state.prompt_len + len(state.ids) + len(ids) >= limits.max_tokens:
            state.done, ep.truncated = True, True  # no room left for the model to answer
            continue
        state.ids += ids
        state.action += [False] * len(ids)
        state.logprobs += [0.0] * len(ids)
        extend_rows.append(i)
        extend_ids.append(ids)
    if extend_rows:
        session.extend(extend_rows, extend_ids)


def _step_all(envs, call, episodes, indices, limits: EpisodeLimits, name: str, rows, g, turn, rows_of=None) -> list:
    """call(k, envs[k]) for every k in `indices`, at most limits.concurrency at once; each episode's environment
    time added to it. An exception stops the run (on_error raise, naming the environment, row and turn) or ends
    that episode (on_error none: its result is None)."""
    indices = list(indices)

    def timed(k):
        start = time.perf_counter()
        try:
            value = call(k, envs[k])
            if inspect.isawaitable(value):  # an `async def` reset or step: run to completion in this thread
                value = asyncio.run(_awaited(value))
            return value, None
        except Exception as exc:  # noqa: BLE001 - the environment is user code: report what it raised
            return None, exc
        finally:
            episodes[k].seconds += time.perf_counter() - start

    if len(indices) > 1 and limits.concurrency > 1:
        with ThreadPoolExecutor(max_workers=min(limits.concurrency, len(indices))) as pool:
            results = list(pool.map(timed, indices))
    else:
        results = [timed(k) for k in indices]
    out = []
    for k, (value, exc) in zip(indices, results):
        if exc is None:
            out.append(value)
            continue
        row = rows_of[k] if rows_of is not None else k // g
        where = "reset" if turn is None else f"turn {turn + 1}"
        message = f"environment {name} raised at row {row} ({_short(rows[row])}), {where}: {exc!r}"
        if limits.on_error == "raise":
            raise EnvironmentFailure(message + " (environment.on_error=none scores such episodes None and goes on)") \
                from exc
        episodes[k].error = message
        out.append(None)
    return out


async def _awaited(value):
    return await value


def _short(row: dict) -> str:
    text = repr(row)
    return text if len(text) <= 120 else text[:117] + "..."


def _rollout(prompt_ids, live: list[_Live], episodes: list[Episode], g: int, tokenizer) -> Rollout:
    """The episodes as one Rollout: completions right-padded, `action_mask` on the model's tokens."""
    from grpo.models import pad_token_id

    n, width = len(live), max(1, max(len(s.ids) for s in live))
    pad = pad_token_id(tokenizer)
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.bool)
    action = torch.zeros((n, width), dtype=torch.bool)
    logprobs = torch.zeros((n, width), dtype=torch.float32)
    for i, s in enumerate(live):
        t = len(s.ids)
        ids[i, :t] = torch.tensor(s.ids, dtype=torch.long)
        mask[i, :t] = True
        action[i, :t] = torch.tensor(s.action, dtype=torch.bool)
        logprobs[i, :t] = torch.tensor(s.logprobs, dtype=torch.float32)
    stats = {"env_s": sum(e.seconds for e in episodes)}
    return Rollout(prompt_ids=[list(p) for p in prompt_ids], completion_ids=ids, completion_mask=mask,
                   truncated=torch.tensor([e.truncated for e in episodes], dtype=torch.bool), group_size=g,
                   sampling_logprobs=logprobs, stats=stats, action_mask=action, episodes=episodes)


def _warn_full_prompt(name: str, row: int, tokens: int, max_tokens: int) -> None:
    """Once per process: a row whose first messages fill environment.max_tokens plays no turn (its
    episodes are empty and truncated: no signal), which a run should not do silently, nor stop for."""
    global _warned_full_prompts
    if not _warned_full_prompts:
        _warned_full_prompts = True
        _log.warning("environment %s: row %d's first messages take %d tokens, so environment.max_tokens=%d leaves "
                     "the model no room for a turn: its episodes are empty and truncated (this warning is shown "
                     "once); raise environment.max_tokens (or set it to null) or shorten the prompt",
                     name, row, tokens, max_tokens)
