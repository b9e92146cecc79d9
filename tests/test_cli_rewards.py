"""Custom rewards through the real command line on the tiny model: the example file, a raising
reward (exit 2, a clear message, no traceback), and None rewards (docs/algorithm.md section 4)."""

import contextlib
import io
import json
import math
from pathlib import Path


from grpo.cli import main

ROOT = Path(__file__).parents[1]
QUICK = [
    "trainer.steps=1", "trainer.batch_size=8", "trainer.micro_batch_size=8", "sampling.group_size=4",
    "sampling.max_new_tokens=6", "data.digits=1", "data.num_eval=4", "eval.before=false", "eval.after=false",
    "output.save_model=false", "trainer.samples_per_step=8",
]


def train(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", *map(str, args)])
    return code, out.getvalue(), err.getvalue()


def test_example_config_with_a_custom_reward_file(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the example names its reward by a path relative to the repository root
    code, out, err = train("examples/custom_reward.yaml", f"model.path={tiny_model_dir}", f"output.dir={tmp_path / 'r'}", *QUICK)
    assert code == 0, err
    metrics = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 <= metrics["reward/close_number/mean"] <= 1 and "reward/answer_accuracy/mean" in metrics


RAISING = '''
def fragile(completion, answer):
    if len(completion) > 0:
        raise ZeroDivisionError("my bug")
    return 1.0
'''


def test_a_raising_reward_stops_the_run_with_a_clear_message(tiny_model_dir, tmp_path):
    (tmp_path / "fragile.py").write_text(RAISING)
    code, _, err = train(f"model.path={tiny_model_dir}", f"output.dir={tmp_path / 'r'}", *QUICK,
                         f"rewards=[{{name: '{tmp_path}/fragile.py:fragile'}}]")
    assert code == 2 and "Traceback" not in err
    assert "reward 'fragile' raised ZeroDivisionError: my bug (at fragile.py:4 in fragile)" in err
    assert "prompt: '" in err and "completion: '" in err and "on_error: none" in err


def test_on_error_none_counts_errors_in_the_metrics(tiny_model_dir, tmp_path):
    (tmp_path / "fragile.py").write_text(RAISING)
    code, _, err = train(f"model.path={tiny_model_dir}", f"output.dir={tmp_path / 'r'}", *QUICK,
                         f"rewards=[{{name: '{tmp_path}/fragile.py:fragile', on_error: none}}, {{name: answer_accuracy}}]")
    assert code == 0, err
    metrics = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["reward/fragile/errors"] == 8


PARTIAL = '''
def odd_only(completion, question):
    """Applies only to problems whose first operand is odd; scores by length so groups differ."""
    if int(question.split()[0]) % 2 == 0:
        return None
    return float(len(completion))
'''


def test_none_rewards_are_left_out_and_give_zero_advantage(tiny_model_dir, tmp_path):
    (tmp_path / "partial.py").write_text(PARTIAL)
    code, _, err = train(f"model.path={tiny_model_dir}", f"output.dir={tmp_path / 'r'}", *QUICK, "trainer.steps=3",
                         f"rewards=[{{name: '{tmp_path}/partial.py:odd_only'}}]")
    assert code == 0, err
    samples = [json.loads(line) for line in (tmp_path / "r" / "samples.jsonl").read_text().splitlines()]
    missing = lambda r: r is None or math.isnan(r)  # noqa: E731  (NaN may be written as null)
    none = [s for s in samples if missing(s["reward"])]
    scored = [s for s in samples if not missing(s["reward"])]
    assert none and scored  # seeded: both kinds of problem were drawn
    assert all(s["advantage"] == 0.0 for s in none)  # every reward None: out of the group, zero advantage
    metrics = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:  # the mean is over the completions the reward applies to, not counting None as 0
        assert missing(m["reward/mean"]) or m["reward/mean"] >= 1.0
