"""`grpo probe`: the statistics on hand-built rewards, and the command end to end on the tiny random model."""

import contextlib
import io
import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from grpo.probe import (distribution, episode_stats, group_signal, hits, histogram, length_stats, pass_at_group,
                        probe_stats, verdict)

nan = math.nan
T = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731


# -- the pure statistics ---------------------------------------------------------------------------------------


def test_distribution_of_few_values_counts_them_and_leaves_none_out():
    d = distribution(T(0, 1, 1, nan))
    assert d["count"] == 3 and d["none"] == 1 and d["min"] == 0 and d["max"] == 1
    assert d["mean"] == pytest.approx(2 / 3, rel=0, abs=1e-12)
    assert d["std"] == pytest.approx(math.sqrt(1 / 3), rel=0, abs=1e-12)  # sample std of 0, 1, 1 (as reward/std)
    assert d["counts"] == {"0": 1, "1": 2} and "histogram" not in d


def test_distribution_of_many_values_is_a_histogram():
    d = distribution(torch.arange(10, dtype=torch.float64))  # 10 distinct values > COUNTS_MAX
    assert "counts" not in d
    assert d["histogram"] == {"edges": [0, 1.5, 3, 4.5, 6, 7.5, 9], "counts": [2, 1, 2, 1, 2, 2]}
    assert histogram(T(2, 2), 3) == {"edges": [2, 2, 2, 2], "counts": [2, 0, 0]}  # no spread: one bin


def test_distribution_of_only_none():
    assert distribution(T(nan, nan)) == {"count": 0, "none": 2, "mean": None, "std": None, "min": None, "max": None}


def test_hits_count_above_zero_and_none_over_all_completions():
    assert hits(T(0, 0.5, nan, -1)) == {"hit_frac": 0.25, "none_frac": 0.25}


def test_group_signal():
    # G = 2: all 1 (top), all 0 (bottom), mixed, all None, all 0.5 (equal, neither end)
    g = group_signal(T(1, 1, 0, 0, 0, 1, nan, nan, 0.5, 0.5), 2)
    assert g["groups"] == 5 and g["no_signal"] == 4 / 5 and g["signal"] == 1 / 5
    assert g["equal_at_top"] == 1 / 5 and g["equal_at_bottom"] == 1 / 5 and g["all_none"] == 1 / 5
    assert g["mean_group_std"] == pytest.approx(math.sqrt(0.5) / 5, rel=0, abs=1e-12)
    one = group_signal(T(nan, 1, 0, 1), 2)  # a group with one valid reward has no signal (as the trainer's)
    assert one["no_signal"] == 0.5 and one["equal_at_top"] == 0.5


def test_pass_at_group_and_lengths():
    assert pass_at_group(T(1, 0, 0, 0, 1, 1), 2) == {"accuracy": 0.5, "pass_at_g": 2 / 3}
    assert pass_at_group(T(0.5, nan), 2) == {"accuracy": 0.0, "pass_at_g": 0.0}  # right means exactly 1
    assert length_stats(torch.tensor([3, 5, 12, 12]), torch.tensor([False, False, True, True])) == {
        "mean_length": 8.0, "truncated": 0.5}


def test_episode_stats_take_what_the_records_have():
    assert episode_stats(None) is None and episode_stats([]) is None
    records = [SimpleNamespace(turns=[1, 2, 3], tool_calls=2, tool_errors=0), {"turns": 1, "tool_calls": 0}]
    assert episode_stats(records) == {"episodes": 2, "turns_mean": 2.0, "turns_max": 3, "tool_calls_mean": 1.0}
    assert episode_stats([SimpleNamespace(num_turns=4)]) == {"episodes": 1, "turns_mean": 4.0, "turns_max": 4}
    failed = [SimpleNamespace(turns=1, error="boom"), SimpleNamespace(turns=2, error=None)]
    assert episode_stats(failed) == {"episodes": 2, "turns_mean": 1.5, "turns_max": 2, "environment_errors": 1}


def stats(totals, G=2, per_function=None, weights=None, truncated=0.0):
    n = len(totals)
    per_function = per_function or {"r": T(*totals)}
    weights = weights or dict.fromkeys(per_function, 1.0)
    trunc = torch.arange(n) < round(truncated * n)
    return probe_stats(per_function, T(*totals), weights, torch.full((n,), 4), trunc, G)


def test_probe_stats_collects_every_number():
    s = stats([1, 0, 0, 0], per_function={"a": T(1, 0, 0, 0), "b": T(nan, 0, 0, 0)}, weights={"a": 1.0, "b": 0.0})
    assert s["rewards"]["a"]["groups_differ"] == 0.5 and s["rewards"]["b"]["groups_differ"] == 0.0
    b = s["rewards"]["b"]
    assert b["none_frac"] == 0.25 and b["count"] == 3 and b["weight"] == 0
    assert s["groups"]["no_signal"] == 0.5 and s["completions"] == {"count": 4, "mean_length": 4.0, "truncated": 0.0}
    assert s["accuracy"] is None and s["episodes"] is None
    assert s["verdict"].startswith("TEACHABLE: 50% of groups have a signal")


def test_verdicts():
    assert stats([0, 1] + [0, 0] * 9)["verdict"].startswith("WEAK SIGNAL: only 10% of groups have a signal")
    easy = stats([0, 1] + [1, 1] * 19 + [0, 0])["verdict"]
    assert easy.startswith("TOO EASY: 95% of groups have equal rewards, 90% all at the top (1)")
    none = stats([0, 0] * 10, per_function={"strict": T(*[0] * 20), "lenient": T(*[1, 0] * 10)},
                 weights={"strict": 1.0, "lenient": 0.0})["verdict"]  # a reward of weight 0 trains nothing
    assert none.startswith("NO SIGNAL: 100% of groups have equal rewards; no completion scores above 0 on strict;")
    same = stats([0.5, 0.5] * 4)["verdict"]
    assert same.startswith("NO SIGNAL: 100% of groups have equal rewards; 100% of groups score all 0.5;")
    assert stats([nan] * 4)["verdict"].startswith("NO REWARD")
    assert "(note: 75% were cut by a length limit)" in stats([0, 1, 0, 1], truncated=0.75)["verdict"]
    assert "note" not in stats([0, 1, 0, 1], truncated=0.25)["verdict"]


def test_verdict_says_which_reward_the_signal_comes_from():
    per = {"format": T(0, 0, 0, 0, 0, 1), "accuracy": T(0, 1, 1, 0, 1, 1), "shown": T(0, 1, 0, 0, 0, 0)}
    s = stats([0, 0.2, 0.2, 0, 0.2, 1.2], per_function=per, weights={"format": 1.0, "accuracy": 0.2, "shown": 0.0})
    assert s["verdict"] == ("TEACHABLE: 100% of groups have a signal (total rewards that differ within the group); "
                            "groups in which each reward differs: accuracy 67%, format 33%")


def test_verdict_reads_only_the_stats():
    s = {"groups": {"signal": 0.2, "no_signal": 0.8, "equal_at_top": 0.0, "equal_at_bottom": 0.8},
         "reward": {"count": 1}, "rewards": {}, "completions": {"truncated": 0.0}}
    assert verdict(s).startswith("WEAK SIGNAL: only 20%")
    assert "algorithm.dynamic_sampling=true trains only on those" in verdict(s)
    assert "algorithm.dynamic_sampling (on) draws about 5 groups for each it trains on" in verdict(s, True)


# -- the command ---------------------------------------------------------------------------------------------

TINY = ["trainer.batch_size=8", "sampling.group_size=4", "sampling.max_new_tokens=12", "data.digits=1",
        "data.num_eval=6", "rewards=[{name: answer_accuracy}, {name: format, weight: 0.5}]"]


def probe_cli(*args) -> str:
    from grpo.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(["probe", *map(str, args)]) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def probed(tiny_model_dir):
    """The probe's JSON and its table, of 3 prompts (two steps' draws: 2 prompts a step) on the tiny model."""
    args = [f"model.path={tiny_model_dir}", *TINY, "--prompts", 3]
    return json.loads(probe_cli(*args, "--json")), probe_cli(*args)


def test_probe_json_numbers_are_those_of_its_samples(probed):
    from grpo.rewards import get_reward

    result, _ = probed
    samples = result["samples"]
    assert result["prompts"] == 3 and result["group_size"] == 4 and len(samples) == 3
    assert result["metric"] == "answer_accuracy"
    totals = [t for s in samples for t in s["totals"]]
    fmt = [v for s in samples for v in s["rewards"]["format"]]
    acc = [v for s in samples for v in s["rewards"]["answer_accuracy"]]
    for s in samples:  # each reward's values are the reward function's on the completions
        assert s["rewards"]["answer_accuracy"] == get_reward("answer_accuracy")(s["completions"], [s["answer"]] * 4)
        assert s["correct"] == s["rewards"]["answer_accuracy"]
    assert totals == [a + 0.5 * f for a, f in zip(acc, fmt)]
    assert result["reward"]["mean"] == pytest.approx(sum(totals) / 12, rel=0, abs=1e-12)
    assert result["reward"]["min"] == min(totals) and result["reward"]["max"] == max(totals)
    assert result["rewards"]["format"]["hit_frac"] == sum(v > 0 for v in fmt) / 12
    equal = [len(set(s["totals"])) == 1 for s in samples]
    assert result["groups"]["no_signal"] == sum(equal) / 3
    assert result["accuracy"]["pass_at_g"] == sum(1 in s["correct"] for s in samples) / 3
    lengths = [n for s in samples for n in s["lengths"]]
    assert result["completions"]["mean_length"] == pytest.approx(sum(lengths) / 12, rel=0, abs=1e-12)
    assert result["completions"]["truncated"] == sum(t for s in samples for t in s["truncated"]) / 12
    assert all(0 < n <= 12 for n in lengths)


def test_probe_table_prints_the_json_numbers(probed):
    result, table = probed
    g = result["groups"]
    assert f"pass@4: {result['accuracy']['pass_at_g']:.1%} of prompts" in table
    assert f"groups with equal rewards (no signal): {g['no_signal']:.1%} of 3" in table
    assert f"completions: mean length {result['completions']['mean_length']:.1f} model tokens" in table
    assert table.rstrip().endswith(f"verdict: {result['verdict']}")
    fmt = result["rewards"]["format"]
    assert any(line.startswith("format") and f"{fmt['mean']:.3g}" in line and f"{fmt['hit_frac']:.0%}" in line
               for line in table.splitlines())


def step_one(overrides: list[str]):
    """The prompts and the scored groups of training step 1 under these overrides (the trainer's own sampling)."""
    from grpo.config import load_config
    from grpo.data import load_task
    from grpo.logging.metrics import Phases
    from grpo.run import build_trainer, load_for_training, needed_columns

    config = load_config(None, overrides)
    model, tokenizer, _, engine, ref = load_for_training(config, log=lambda text: None)
    train = load_task(config.data, needed_columns(config)).train
    trainer = build_trainer(config, model, tokenizer, engine, train, ref_model=ref)
    rows = trainer.sampler.next(config.prompts_per_step)
    return rows, trainer.generate_and_score(rows, Phases())


def assert_step_one(result: dict, overrides: list[str]) -> None:
    """The probe's first B groups are step 1's: the same prompts, seeds, engine, completions and rewards."""
    rows, scored = step_one(overrides)
    b = len(rows)
    assert [s["prompt"] for s in result["samples"][:b]] == [r["prompt"] for r in rows]
    assert [c for s in result["samples"][:b] for c in s["completions"]] == scored.completions
    assert [t for s in result["samples"][:b] for t in s["totals"]] == scored.rewards.total.tolist()


def test_probe_samples_what_training_step_one_samples(probed, tiny_model_dir):
    assert_step_one(probed[0], [f"model.path={tiny_model_dir}", *TINY])


def grpo(*args):
    return subprocess.run([sys.executable, "-m", "grpo", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_probe_refuses_a_bad_config_before_the_model_loads(tiny_model_dir):
    proc = grpo("probe", f"model.path={tiny_model_dir}", *TINY, "trainer.lrr=1")
    assert proc.returncode == 2 and "did you mean 'lr'" in proc.stderr and "Traceback" not in proc.stderr
    assert "sampling:" not in proc.stderr + proc.stdout  # load_for_training never ran
    proc = grpo("probe", f"model.path={tiny_model_dir}", "--prompts", 0)
    assert proc.returncode == 2 and "--prompts 0: give at least 1 prompt" in proc.stderr


def test_probe_in_help():
    assert "probe" in grpo("--help").stdout
    text = grpo("probe", "--help").stdout
    assert "--prompts" in text and "--json" in text and "TEACHABLE" in text and "sampling.group_size" in text


def test_table_without_a_check_with_episodes_and_a_histogram():
    from grpo.probe import format_probe

    n = 10
    s = probe_stats({"close": torch.arange(n, dtype=torch.float64)}, torch.arange(n, dtype=torch.float64),
                    {"close": 1.0}, torch.full((n,), 7), torch.zeros(n, dtype=torch.bool), 2,
                    episodes=[{"turns": 2, "tool_calls": 1}] * n)
    s.update(model="m", prompts=5, temperature=1.0, max_new_tokens=8, metric=None,
             samples=[{"prompt": "p", "totals": [0.0, None], "completions": ["a", "b"]}])
    table = format_probe(s)
    assert "probe: 5 training prompts x 2 episodes (temperature 1, max_new_tokens 8 per turn) from m" in table
    assert "episodes: mean length 7.0 model tokens; 0.0% truncated (hit a limit: max_new_tokens" in table
    assert "accuracy: the task has no check of right answers (eval.metric, an answer column): skipped" in table
    assert "per episode: turns mean 2, turns max 2, tool calls mean 1 (10 episodes)" in table
    assert "6 bins from 0 to 9: 2 1 2 1 2 2" in table and "     0  a" in table and "  None  b" in table
    assert table.rstrip().endswith("verdict: TEACHABLE: 100% of groups have a signal (total rewards that "
                                          "differ within the group)")


def test_probe_of_multi_turn_episodes(tiny_model_dir):
    """An environment's episodes come through sample_rows: the probe reports turns and tool calls per episode."""
    args = [f"model.path={tiny_model_dir}", *TINY[:-1], "rewards=[{name: environment}]", "sampling.max_new_tokens=6",
            "environment.name=calculator", "data.digits=2", "data.operators=['*']", "environment.max_turns=2"]
    result = json.loads(probe_cli(*args, "--prompts", 2, "--json"))
    assert_step_one(result, args)
    ep, samples = result["episodes"], result["samples"]
    records = [e for s in samples for e in s["episodes"]]
    assert ep["episodes"] == len(records) == 8 and 1 <= ep["turns_mean"] <= ep["turns_max"] <= 2
    assert ep["tool_calls_mean"] == sum(e["tool_calls"] for e in records) / 8
    assert ep["environment_errors"] == 0 and result["metric"] == "environment"
