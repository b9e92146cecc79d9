"""Held-out evaluation: greedy accuracy, pass@k, and the mean of each configured reward."""

from __future__ import annotations

import torch

from grpo.data import accuracy_reward, chat_messages
from grpo.models import encode_prompt
from grpo.rewards import Reward, build_rewards, get_reward, score
from grpo.rollout.base import SamplingParams


def evaluate(model, tokenizer, engine, rows: list[dict], config, progress=None) -> dict:
    """Greedy accuracy (the task's accuracy reward on the greedy completion), pass@k (k sampled completions,
    at least one right) when eval.k > 1, and each configured reward's mean on the greedy completions."""
    ev, data = config.eval, config.data
    rows = rows[: ev.num_problems] if ev.num_problems else rows
    if not rows:
        raise ValueError("no evaluation rows: the task has no eval split (set data.eval_file)")
    max_new = ev.max_new_tokens or config.sampling.max_new_tokens
    # accuracy is the task's own check (answer_accuracy, math_accuracy or countdown), scored first
    specs = [s for s in build_rewards(config.rewards) if s.name != "accuracy"]
    specs.insert(0, Reward("accuracy", get_reward(accuracy_reward(data.task)), 0.0))
    greedy = SamplingParams(max_new_tokens=max_new, temperature=0.0, stop=tuple(config.sampling.stop))
    sampled = SamplingParams(
        max_new_tokens=max_new, temperature=config.sampling.temperature, top_p=config.sampling.top_p,
        top_k=config.sampling.top_k, min_p=config.sampling.min_p, stop=tuple(config.sampling.stop),
    )
    generator = torch.Generator().manual_seed(config.trainer.seed + 1)
    per_reward: dict[str, list[float]] = {}
    correct, passed, examples = [], [], []
    for start in range(0, len(rows), ev.batch_size):
        chunk = rows[start : start + ev.batch_size]
        prompt_ids = [encode_prompt(tokenizer, chat_messages(r[data.prompt_column], data.system_prompt)) for r in chunk]
        texts = _complete(engine, tokenizer, prompt_ids, 1, greedy, generator)
        result = _score(specs, tokenizer, prompt_ids, texts, chunk, data.prompt_column, 1)
        for name, values in result.per_function.items():
            if name == "accuracy":
                continue  # reported as accuracy
            per_reward.setdefault(name, []).extend(v for v in values.tolist() if v == v)
        correct += result.per_function["accuracy"].tolist()
        for r, text, ok in zip(chunk, texts, result.per_function["accuracy"].tolist()):
            if len(examples) < 8:
                examples.append({"prompt": r[data.prompt_column], "answer": r.get("answer"), "completion": text, "correct": ok})
        if ev.k > 1:
            texts = _complete(engine, tokenizer, prompt_ids, ev.k, sampled, generator)
            acc = _score(specs[:1], tokenizer, prompt_ids, texts, chunk, data.prompt_column, ev.k)
            passed += (acc.per_function["accuracy"].view(-1, ev.k) == 1).any(dim=1).float().tolist()
        if progress:
            progress(min(start + ev.batch_size, len(rows)), len(rows))
    valid = [c for c in correct if c == c]
    out = {
        "num_problems": len(rows),
        "accuracy": sum(valid) / max(len(valid), 1),
        "rewards": {name: sum(v) / len(v) for name, v in per_reward.items() if v},
        "examples": examples,
    }
    if ev.k > 1:
        out[f"pass@{ev.k}"] = sum(passed) / len(passed)
    return out


def _complete(engine, tokenizer, prompt_ids, k, params, generator) -> list[str]:
    rollout = engine.generate(prompt_ids, k, params, generator)
    return tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)


def _score(specs, tokenizer, prompt_ids, texts, rows, prompt_column, k):
    prompts = [tokenizer.decode(p) for p in prompt_ids for _ in range(k)]
    columns = {c: [r.get(c) for r in rows for _ in range(k)] for c in rows[0] if c != prompt_column}
    return score(specs, prompts, texts, columns)


def format_table(results: dict[str, dict]) -> str:
    """A small text table: one column per evaluation (e.g. before / after)."""
    names = list(results)
    keys = ["accuracy"] + sorted({k for r in results.values() for k in r if k.startswith("pass@")})
    reward_names = sorted({k for r in results.values() for k in r.get("rewards", {})})
    lines = [f"{'':<24}" + "".join(f"{n:>12}" for n in names)]
    for key in keys:
        lines.append(f"{key:<24}" + "".join(f"{results[n].get(key, float('nan')):>12.3f}" for n in names))
    for rn in reward_names:
        lines.append(f"{'reward/' + rn:<24}" + "".join(f"{results[n]['rewards'].get(rn, float('nan')):>12.3f}" for n in names))
    lines.append(f"{'problems':<24}" + "".join(f"{results[n]['num_problems']:>12d}" for n in names))
    return "\n".join(lines)
