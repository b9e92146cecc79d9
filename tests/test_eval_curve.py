"""The held-out curve: an evaluation every eval.every steps on the same held-out problems as before and after,
logged in that step's metrics line, run between steps (every rank its share) without touching training, drawn in the report."""

import json

import pytest

from grpo.config import ConfigError, load_config
from grpo.evaluate import curve_due, curve_metrics
from grpo.report import build_report
from grpo.report.html import held_out_curve

from curve_helpers import train


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def curve_run(tiny_model_dir, tmp_path_factory):
    """3 steps, evaluated every step (but the last: the evaluation after training is the curve's end)."""
    out = tmp_path_factory.mktemp("curve") / "run"
    stdout = train(tiny_model_dir, out, "trainer.steps=3", "eval.every=1")
    return out, stdout


@pytest.fixture(scope="module")
def two_steps(tiny_model_dir, tmp_path_factory):
    """The same run stopped after 2 steps, without evaluations during training."""
    out = tmp_path_factory.mktemp("plain") / "run"
    train(tiny_model_dir, out, "trainer.steps=2")
    return out


def test_eval_every_is_off_by_default_and_validated():
    assert load_config(None).eval.every == 0
    with pytest.raises(ConfigError, match=r"eval.every: Input should be greater than or equal to 0"):
        load_config(None, ["eval.every=-1"])


@pytest.mark.parametrize("every, steps, after, due", [
    (0, 4, True, []), (1, 4, True, [1, 2, 3]), (2, 5, True, [2, 4]), (2, 4, True, [2]), (2, 4, False, [2, 4]),
    (5, 4, True, []),
])
def test_curve_due(every, steps, after, due):
    cfg = load_config(None, [f"eval.every={every}", f"trainer.steps={steps}", f"eval.after={after}"])
    assert [s for s in range(1, steps + 1) if curve_due(cfg, s)] == due


def test_curve_metrics():
    result = {"accuracy": 0.25, "reward": 0.5, "rewards": {"answer_accuracy": 0.25, "format": 1.0}, "num_problems": 4}
    assert curve_metrics(result) == {"eval/accuracy": 0.25, "eval/reward": 0.5, "eval/reward/answer_accuracy": 0.25,
                                     "eval/reward/format": 1.0}
    assert curve_metrics({"accuracy": None, "reward": 0.5, "rewards": {}}) == {"eval/reward": 0.5}


def test_held_out_curve_joins_before_the_steps_and_after():
    metrics_ = [{"step": 1}, {"step": 2, "eval/accuracy": 0.5}, {"step": 3}, {"step": 4, "eval/accuracy": 0.75}]
    evals = {"before": {"accuracy": 0.25}, "after": {"accuracy": 1.0, "reward": 2.0}}
    assert held_out_curve(metrics_, evals) == [(0, 0.25), (2, 0.5), (4, 0.75), (4, 1.0)]
    assert held_out_curve(metrics_, evals, "reward") == [(4, 2.0)]
    assert held_out_curve([], {}) == []


def test_the_curve_is_logged_at_its_steps(curve_run):
    out, stdout = curve_run
    m = metrics(out)
    assert [s["step"] for s in m] == [1, 2, 3]
    for s in m[:2]:
        assert {"eval/accuracy", "eval/reward", "eval/reward/test_char_score", "eval/reward/answer_accuracy"} <= set(s)
        assert s["eval/accuracy"] == s["eval/reward/test_char_score"]  # eval.metric's mean is the accuracy
    assert not any(k.startswith("eval/") for k in m[2])  # the last step's point is eval_after.json
    assert "step 1: held-out accuracy" in stdout and "step 2: held-out accuracy" in stdout
    before = json.loads((out / "eval_before.json").read_text())
    assert before["num_problems"] == 5 and 0 < before["accuracy"] < 1


def test_the_curve_evaluates_the_weights_of_its_step_and_leaves_training_alone(curve_run, two_steps):
    """The 2-step run without evaluations trains exactly as the first 2 steps of the evaluated run (evaluating does
    not move a random stream or a weight), and its evaluation after training is the curve's point at step 2."""
    curve, plain = metrics(curve_run[0]), metrics(two_steps)
    for a, b in zip(curve[:2], plain, strict=True):
        for key in ("reward/mean", "loss", "grad_norm", "completion/length_mean"):
            assert a[key] == b[key], key
    after = json.loads((two_steps / "eval_after.json").read_text())
    assert curve[1]["eval/accuracy"] == after["accuracy"]
    assert curve[1]["eval/reward"] == after["reward"]


def test_the_report_draws_the_curve(curve_run):
    out, _ = curve_run
    html = build_report(out)
    evals = {n: json.loads((out / f"eval_{n}.json").read_text()) for n in ("before", "after")}
    points = held_out_curve(metrics(out), evals)
    assert [x for x, _ in points] == [0, 1, 2, 3]
    for x, _ in points:
        assert f"held-out (eval/accuracy) @ step {x}:" in html
    assert "held-out before/after @ step 0:" in html and "held-out before/after @ step 3:" in html
    assert "Held-out reward" in html and "eval/reward/test_char_score @ step 2:" in html
