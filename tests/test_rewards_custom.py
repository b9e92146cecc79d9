"""Users' own reward functions: found by file or module path, checked at config time, called in
both shapes (batch / per completion, sync / async), and their failures never silent."""

import asyncio
import math
import threading
import time

import pytest

from grpo.config import ConfigError, load_config
from grpo.rewards import Reward, RewardError, get_reward, is_per_completion, required_columns, score

USER_FILE = '''
import asyncio

def per_row(completion, answer):
    return float(completion == answer)

def batch(completions, answer, prompts=None):
    return [float(c == a) for c, a in zip(completions, answer)]

async def per_row_async(completion, answer):
    await asyncio.sleep(0)
    return float(completion == answer)

def needs_level(completion, level, scale=1.0):
    return level * scale

def picky(completion):
    if completion == "bad":
        raise ValueError("cannot score this one")
    return 1.0

def picky_batch(completions):
    return [1 / (c != "bad") for c in completions]

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def user_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_FILE)
    return path


def test_file_path_and_module_path(user_file):
    assert get_reward("my_rewards.py:per_row")("5", "5") == 1.0
    assert get_reward(f"{user_file}:batch")(["5", "6"], ["5", "5"]) == [1.0, 0.0]
    assert get_reward("grpo.rewards.builtin:answer_accuracy") is get_reward("answer_accuracy")


@pytest.mark.parametrize(
    "name, message",
    [
        ("nofile.py:f", "no such file nofile.py"),
        ("my_rewards.py:nope", "has no function 'nope'; functions there: batch, needs_level, per_row"),
        ("my_rewards.py:NOT_A_FUNCTION", "is a int, not a function"),
        ("no_such_package.mod:f", "cannot import module 'no_such_package.mod'"),
        ("acc", "unknown reward 'acc'"),
    ],
)
def test_config_time_errors(user_file, name, message):
    with pytest.raises(ConfigError, match="rewards.0") as e:
        load_config(None, [f"rewards=[{{name: '{name}'}}]"])
    assert message in str(e.value)


def test_import_error_names_the_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.py").write_text("x = 1\ny = undefined_name\n")
    with pytest.raises(ConfigError, match=r"importing broken.py failed: NameError: .*broken.py:2"):
        load_config(None, ["rewards=[{name: 'broken.py:f'}]"])


def test_unknown_args_and_duplicate_labels_are_config_errors(user_file):
    with pytest.raises(ConfigError, match="takes no argument 'scal'"):
        load_config(None, ["rewards=[{name: 'my_rewards.py:needs_level', args: {scal: 2}}]"])
    with pytest.raises(ConfigError, match="two rewards are named 'format'"):
        load_config(None, ["rewards=[{name: format}, {name: format, args: {tags: [think]}}]"])
    cfg = load_config(None, ["rewards=[{name: format}, {name: format, label: think_tag, args: {tags: [think]}}]"])
    assert [r.metric_name for r in cfg.rewards] == ["format", "think_tag"]


def test_shapes_and_required_columns(user_file):
    assert is_per_completion(get_reward("my_rewards.py:per_row")) and not is_per_completion(get_reward("my_rewards.py:batch"))
    assert required_columns(get_reward("my_rewards.py:needs_level")) == ["level"]
    assert required_columns(get_reward("my_rewards.py:batch")) == ["answer"]


@pytest.mark.parametrize("fn", ["per_row", "batch", "per_row_async"])
def test_every_shape_scores_the_same(user_file, fn):
    r = Reward(fn, get_reward(f"my_rewards.py:{fn}"), concurrency=3)
    result = score([r], ["p"] * 4, ["1", "2", "3", "4"], {"answer": ["1", "0", "3", "0"], "extra": [0] * 4})
    assert result.total.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_per_completion_rewards_run_in_parallel():
    seen = set()

    def slow(completion):
        seen.add(threading.get_ident())
        time.sleep(0.2)
        return 1.0

    async def slow_async(completion):
        await asyncio.sleep(0.2)
        return 1.0

    for fn in (slow, slow_async):
        start = time.perf_counter()
        score([Reward("slow", fn, concurrency=8)], ["p"] * 8, ["c"] * 8, {})
        assert time.perf_counter() - start < 0.2 * 8 / 2  # sequential would take 1.6 s
    assert len(seen) > 1


def test_raising_reward_names_the_failing_completion(user_file):
    for fn in ("picky", "picky_batch"):  # a batch reward is re-run per completion to find it
        with pytest.raises(RewardError) as e:
            score([Reward(fn, get_reward(f"my_rewards.py:{fn}"))], ["p0", "p1", "p2"], ["ok", "bad", "ok"], {})
        msg = str(e.value)
        assert f"reward '{fn}' raised" in msg and "completion 1 of 3" in msg
        assert "prompt: 'p1'" in msg and "completion: 'bad'" in msg and "my_rewards.py:" in msg and "on_error: none" in msg


def test_on_error_none_scores_none_and_counts(user_file):
    for fn in ("picky", "picky_batch"):
        r = Reward(fn, get_reward(f"my_rewards.py:{fn}"), on_error="none")
        result = score([r], ["p"] * 3, ["ok", "bad", "bad"], {})
        assert result.errors == {fn: 2}
        assert result.total[0] == 1.0 and math.isnan(result.total[1]) and math.isnan(result.total[2])


def test_wrong_length_and_non_numbers_are_errors_even_with_on_error_none():
    with pytest.raises(RewardError, match="list of 2 values"):
        score([Reward("short", lambda completions: [1.0], on_error="none")], ["p"] * 2, ["a", "b"], {})
    with pytest.raises(RewardError, match="returned 'yes'"):
        score([Reward("text", lambda completion: "yes", on_error="none")], ["p"], ["a"], {})
