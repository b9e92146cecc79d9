"""`grpo sweep`: one config over several seeds, each a whole run in OUTPUT/seed-N, and the mean and spread of the
held-out results (sweep.json, the printed table, sweep.html with every seed's curve on one chart)."""

import contextlib
import io
import json
import math

import pytest

from grpo.config import ConfigError, load_config
from grpo.sweep import format_summary, parse_seeds, seed_config, spread, summarize

from curve_helpers import RUN, char_score


def sweep(tiny_model_dir, out, *args):
    """(exit code, stdout, stderr) of `grpo sweep` in this process, so a test reward can be registered."""
    from grpo.cli import main
    from grpo.rewards import REWARDS

    REWARDS.setdefault("test_char_score", char_score)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["sweep", f"model.path={tiny_model_dir}", *RUN, "trainer.steps=2", "eval.every=1",
                     "--output", str(out), "--log-format", "plain", *args])
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def swept(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "sw"
    code, stdout, stderr = sweep(tiny_model_dir, out, "--seeds", "0,1")
    assert code == 0, stdout + stderr
    return out, stdout


def test_parse_seeds():
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds("3") == [3]
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("5, 0-1") == [5, 0, 1]
    assert parse_seeds("-1") == [-1]
    for bad, why in [("a,b", "integers"), ("", "integers"), ("1,1", "twice"), ("0-1,1", "twice"), ("3-1", "no seed")]:
        with pytest.raises(ConfigError, match=why):
            parse_seeds(bad)


def test_spread_is_mean_sample_std_min_max():
    s = spread([0.5, 0.6, 0.8])
    assert s["mean"] == pytest.approx(0.6333333333333333, rel=0, abs=1e-15)
    assert s["std"] == pytest.approx(math.sqrt((0.4 / 3) ** 2 / 2 + (0.1 / 3) ** 2 / 2 + (0.5 / 3) ** 2 / 2), rel=0, abs=1e-15)
    assert (s["min"], s["max"]) == (0.5, 0.8)
    assert spread([0.25]) == {"mean": 0.25, "std": 0.0, "min": 0.25, "max": 0.25}


def test_seed_config_changes_only_the_seed_and_the_folder(tmp_path):
    cfg = load_config(None, ["trainer.lr=3e-6", "data.seed=7"])
    one = seed_config(cfg, 4, tmp_path)
    assert one.trainer.seed == 4 and one.output.dir == str(tmp_path / "seed-4")
    assert one.data.seed == 7 and one.trainer.lr == 3e-6 and cfg.trainer.seed == 0  # the held-out set stays


def test_summarize_and_the_table():
    runs = [{"seed": s, "run_dir": f"r/seed-{s}", "value": "accuracy", "metric": "answer_accuracy", "num_problems": 80,
             "before": 0.5, "after": a, "gain": a - 0.5, "steps": 40, "train_seconds": t}
            for s, a, t in [(0, 0.75, 300.0), (1, 0.625, 360.0), (2, 0.7, 330.0)]]
    s = summarize(runs)
    assert s["seeds"] == [0, 1, 2] and s["gain"]["min"] == 0.125 and s["gain"]["max"] == 0.25
    assert s["after"]["mean"] == pytest.approx((0.75 + 0.625 + 0.7) / 3, rel=0, abs=1e-15)
    assert s["before"]["std"] == 0.0 and s["train_seconds"]["mean"] == 330.0
    table = format_summary(s)
    assert "seed 1         50.0%     62.5%    +12.5%" in table
    assert "mean           50.0%     69.2%    +19.2%" in table and "min            50.0%     62.5%    +12.5%" in table
    assert "std" in table and "5 min 30 s" in table


def test_each_seed_is_a_whole_run_in_its_folder(swept):
    out, _ = swept
    for seed in (0, 1):
        run = out / f"seed-{seed}"
        assert load_config(run / "config.yaml").trainer.seed == seed
        assert {"eval_before.json", "eval_after.json", "metrics.jsonl", "report.html", "model"} <= {p.name for p in run.iterdir()}


def test_the_summary_is_the_seeds_own_results(swept):
    out, stdout = swept
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["value"] == "accuracy" and summary["metric"] == "test_char_score"
    for r in summary["runs"]:
        before = json.loads((out / f"seed-{r['seed']}" / "eval_before.json").read_text())["accuracy"]
        after = json.loads((out / f"seed-{r['seed']}" / "eval_after.json").read_text())["accuracy"]
        assert (r["before"], r["after"], r["gain"]) == (before, after, after - before)
        assert r["steps"] == 2 and r["train_seconds"] > 0
    afters = [r["after"] for r in summary["runs"]]
    assert afters[0] != afters[1]  # the seeds trained differently
    assert summary["runs"][0]["before"] == summary["runs"][1]["before"]  # the same model on the same problems
    assert summary["after"] == spread(afters) and summary["gain"] == spread([r["gain"] for r in summary["runs"]])
    assert format_summary(summary) in stdout


def test_the_sweep_page_draws_every_seed_s_curve(swept):
    out, _ = swept
    html = (out / "sweep.html").read_text()
    summary = json.loads((out / "sweep.json").read_text())
    for r in summary["runs"]:
        for step in (0, 1, 2):  # before, the evaluation at step 1, after
            assert f"seed {r['seed']} @ step {step}:" in html
        assert f'href="seed-{r["seed"]}/report.html"' in html


def test_resume_keeps_finished_seeds_and_trains_the_new_one(swept, tiny_model_dir):
    out, _ = swept
    kept = {s: (out / f"seed-{s}" / "metrics.jsonl").stat().st_mtime_ns for s in (0, 1)}
    code, stdout, stderr = sweep(tiny_model_dir, out, "--seeds", "0-2", "--resume")
    assert code == 0, stdout + stderr
    assert {s: (out / f"seed-{s}" / "metrics.jsonl").stat().st_mtime_ns for s in (0, 1)} == kept
    assert "seed 0 (1/3): finished earlier" in stdout and "seed 2 (3/3): training" in stdout
    assert json.loads((out / "sweep.json").read_text())["seeds"] == [0, 1, 2]


def test_an_existing_seed_folder_is_refused_before_anything_trains(tiny_model_dir, tmp_path):
    out = tmp_path / "sw"
    (out / "seed-1").mkdir(parents=True)
    (out / "seed-1" / "notes.txt").write_text("mine")
    code, stdout, stderr = sweep(tiny_model_dir, out, "--seeds", "0,1")
    assert code == 2 and "seed-1 already exists" in stderr and "--overwrite" in stderr
    assert not (out / "seed-0").exists()


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0", "eval.after=false"], "set eval.before=true and eval.after=true"),
    (["--seeds", "x"], "give integers"),
    (["--seeds", "0", "--resume", "--overwrite"], "give only one of them"),
])
def test_sweep_refuses(tiny_model_dir, tmp_path, args, message):
    code, stdout, stderr = sweep(tiny_model_dir, tmp_path / "sw", *args)
    assert code == 2 and message in stderr
    assert not (tmp_path / "sw").exists()


def test_train_times_round_to_the_second_before_splitting_minutes():
    from grpo.sweep import _minutes

    assert [_minutes(s) for s in (419.6, 419.4, 59.5, 0.0)] == ["7 min 00 s", "6 min 59 s", "1 min 00 s", "0 min 00 s"]
    assert _minutes(float("nan")) == "-"
