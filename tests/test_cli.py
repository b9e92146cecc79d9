"""The real command line on the tiny random model: a 2-step training run, eval, help, user errors."""

import contextlib
import io
import json
import re
import subprocess
import sys

import pytest

from grpo.config import Config

TINY = [
    "trainer.steps=2", "trainer.batch_size=8", "trainer.micro_batch_size=3", "sampling.group_size=4",
    "sampling.max_new_tokens=12", "data.digits=1", "data.num_eval=6", "trainer.samples_per_step=3", "trainer.lr=1e-3",
]


def grpo(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "grpo", *map(str, args)], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"grpo {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def vowels(prompts, completions, **kwargs):
    """A test reward that differs within every group of the random tiny model, so weights must move."""
    return [float(sum(c in "aeiou" for c in text)) for text in completions]


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    """One 2-step training run through the CLI's entry point, in-process so a test reward can be registered."""
    from grpo.cli import main
    from grpo.rewards import REWARDS

    REWARDS.setdefault("test_vowels", vowels)
    out = tmp_path_factory.mktemp("runs") / "run"
    rewards = "rewards=[{name: answer_accuracy}, {name: format, weight: 0.5}, {name: test_vowels, weight: 0.1}]"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["train", f"model.path={tiny_model_dir}", f"output.dir={out}", *TINY, rewards]) == 0
    assert "step 2/2" in stdout.getvalue() and "held-out evaluation" in stdout.getvalue()
    assert re.search(r"tok/s \| mem \d+\.\dG \|", stdout.getvalue())  # each step's line shows the peak memory
    assert "sampling: fast engine: fused decode steps" in stdout.getvalue()  # the run says how it samples
    return out


def test_training_subprocess_smoke(tiny_model_dir, tmp_path):
    """The installed command itself, end to end, as a user runs it."""
    proc = grpo("train", f"model.path={tiny_model_dir}", f"output.dir={tmp_path / 'r'}", *TINY, "trainer.steps=1", "eval.before=false")
    assert "step 1/1" in proc.stdout and (tmp_path / "r" / "model" / "config.json").is_file()


def test_training_run_writes_the_run_folder(run_dir):
    assert {p.name for p in run_dir.iterdir()} >= {"config.yaml", "metrics.jsonl", "samples.jsonl", "eval_before.json", "eval_after.json", "model"}
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    spec_metrics = [
        "reward/mean", "reward/std", "reward/answer_accuracy/mean", "reward/format/mean", "reward/zero_std_frac",
        "completion/length_mean", "completion/length_min", "completion/length_max", "completion/truncated_frac",
        "kl/mean", "clip/low_frac", "clip/high_frac", "entropy/mean", "grad_norm", "lr", "time/generate",
        "time/score", "time/reference", "time/train", "throughput/tokens_per_s",
    ]
    for name in spec_metrics:
        assert name in metrics[0], name
    for m in metrics:  # the process's memory (GiB): the tiny model's run holds far more than nothing, below 24 GiB
        assert 0.1 < m["memory/rss_gib"] <= m["memory/peak_rss_gib"] < 24 and "memory/cuda_peak_gib" not in m
    assert metrics[0]["ratio/mean"] == pytest.approx(1.0, abs=1e-6)  # mu = 1: pi_old is pi_theta
    assert metrics[0]["kl/mean"] == pytest.approx(0.0, abs=1e-7)  # the policy starts at the reference
    assert metrics[1]["kl/mean"] > 0 and metrics[0]["advantage/abs_mean"] > 0
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and {"prompt", "completion", "rewards", "reward", "advantage", "length", "truncated"} <= set(samples[0])


def test_saved_model_loads_with_transformers_and_changed(run_dir, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trained = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    AutoTokenizer.from_pretrained(run_dir / "model")
    diffs = [float((a - b).abs().max()) for a, b in zip(trained.state_dict().values(), start.state_dict().values())]
    assert max(diffs) > 0  # two optimizer steps moved the weights


def test_resolved_config_is_written_and_reloads(run_dir):
    from grpo.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    assert isinstance(cfg, Config) and cfg.trainer.steps == 2 and cfg.rewards[1].weight == 0.5


def test_eval_on_a_run_folder(run_dir):
    from grpo.cli import main

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["eval", str(run_dir), "eval.k=2"]) == 0
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["num_problems"] == 6 and 0 <= result["accuracy"] <= 1 and "pass@2" in result
    assert result["model"] == str(run_dir / "model")
    assert "accuracy" in stdout.getvalue() and "pass@2" in stdout.getvalue()


def test_existing_run_folder_is_refused(run_dir, tiny_model_dir):
    before = (run_dir / "metrics.jsonl").read_text()
    proc = grpo("train", f"model.path={tiny_model_dir}", f"output.dir={run_dir}", *TINY, check=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr and "--overwrite" in proc.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before  # nothing of the earlier run lost


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["sampling.group_size=1"], "sampling.group_size: Input should be greater than or equal to 2"),
        (["trainer.lr=-1"], "trainer.lr: Input should be greater than 0"),
        (["algorithm.loss_type=ppo"], "algorithm.loss_type"),
        (["trainer.batch_size=10"], "must be a multiple of sampling.group_size"),
        (["model.path=/no/such/dir"], "model.path: no such file or folder"),
        (["trainer.lrr=1"], "did you mean 'lr'"),
    ],
)
def test_user_errors_exit_2_without_traceback(overrides, message, tmp_path):
    proc = grpo("train", f"output.dir={tmp_path / 'r'}", *overrides, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()  # rejected before anything was written or loaded


def test_missing_column_in_prompt_file(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1?", "answer": "2"}\n{"prompt": "2+2?"}\n')
    proc = grpo("train", f"model.path={tiny_model_dir}", "data.task=file", f"data.train_file={data}", f"output.dir={tmp_path / 'r'}", check=False)
    assert proc.returncode == 2 and "d.jsonl: row 2 has no 'answer' column" in proc.stderr


def test_help_explains_every_option():
    top = grpo("--help").stdout
    assert "train" in top and "eval" in top
    train_help, eval_help = grpo("train", "--help").stdout, grpo("eval", "--help").stdout
    for section, model in Config.model_fields.items():
        fields = getattr(model.annotation, "model_fields", None)
        names = [f"{section}.{f}" for f in fields] if fields else [section]
        for name in names:
            assert name in train_help and name in eval_help, name
