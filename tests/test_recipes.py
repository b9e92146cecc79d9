"""Each shipped recipe (configs/*.yaml, examples/*.yaml) and each sample data file (src/grpo/data/samples/)
runs through the real CLI on the tiny random model: 1 step, tiny batch, the evaluation before training on
two held-out problems. A GPU recipe (GPU_RECIPES) names a hub model and data files the user supplies: it is
validated with the sample file in their place and run for one step on the tiny model, never as shipped."""

import contextlib
import io
import json
from pathlib import Path

import pytest

from grpo.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
GPU_RECIPES = ["gsm8k_gpu"]  # a hub model, the user's files, a GPU to be worth running: see test_gpu_recipe_*
FILE_RECIPES = ["files"]  # a task from files (the starter for a user's own): see test_file_recipe_*
RECIPES = sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem not in GPU_RECIPES + FILE_RECIPES)
EXAMPLES = sorted(p.stem for p in (REPO / "examples").glob("*.yaml"))
SAMPLES = REPO / "src" / "grpo" / "data" / "samples"
TINY = [
    "trainer.steps=1", "trainer.batch_size=4", "trainer.micro_batch_size=4", "sampling.group_size=2",
    "sampling.max_new_tokens=10", "data.digits=1", "data.num_eval=4", "eval.num_problems=2", "eval.after=false",
    "trainer.samples_per_step=2", "model.threads=null", "output.save_model=false",
]


def run_recipe(name, tiny_model_dir, out, *extra, folder=CONFIGS):
    """(metrics of each step, eval_before.json) of a 1-step run of folder/name.yaml, or of the overrides alone."""
    from grpo.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    config = [str(folder / f"{name}.yaml")] if name else []
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["train", *config, f"model.path={tiny_model_dir}", f"output.dir={out}", *TINY, *extra])
    assert code == 0, stdout.getvalue() + stderr.getvalue()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return metrics, json.loads((out / "eval_before.json").read_text())


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_is_a_complete_config_for_the_default_model(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    built_in = "guess_number" if cfg.environment.name == "guess_number" else "arithmetic"  # data of its own
    assert cfg.model.path is None and cfg.data.task == built_in and cfg.eval.before and cfg.eval.after
    assert cfg.output.dir == f"runs/{name}"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_through_the_cli(name, tiny_model_dir, tmp_path):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    extra = ["algorithm.max_sampling_rounds=2"] if cfg.algorithm.dynamic_sampling else []
    if cfg.environment.enabled:  # the tiny model's tokenizer spells prompts out a character a token
        extra.append("environment.max_tokens=null")
        if cfg.environment.name == "guess_number":  # a demonstrated game: ~560 characters, past its 512 positions
            extra.append("environment.args.demonstrate=false")
    metrics, before = run_recipe(name, tiny_model_dir, tmp_path / name, *extra)
    m = metrics[0]
    # an environment run's accuracy is the environment's own reward (grpo.evaluate.accuracy_check)
    assert before["metric"] == (cfg.eval.metric or ("environment" if cfg.environment.enabled else "answer_accuracy"))
    assert 0 <= before["accuracy"] <= 1 and before["num_problems"] == 2
    assert m["step"] == 1 and m["loss"] == m["loss"] and m["grad_norm"] >= 0  # finite, not NaN
    if cfg.algorithm.dynamic_sampling:
        assert m["dynamic_sampling/groups_kept"] + m["dynamic_sampling/groups_filled"] == 2
        assert 1 <= m["dynamic_sampling/rounds"] <= 2 and m["dynamic_sampling/groups_drawn"] >= 2
    if cfg.algorithm.advantage == "process":
        assert "advantage/steps_per_completion" in m
    if cfg.algorithm.mu == 1:
        assert m["ratio/mean"] == pytest.approx(1.0, abs=1e-6)
    assert ("kl/mean" in m) == (cfg.algorithm.beta > 0)


GSM8K_SAMPLE = SAMPLES / "gsm8k_sample.jsonl"


def test_gpu_recipes_are_shipped_configs():
    assert set(GPU_RECIPES) <= {p.stem for p in CONFIGS.glob("*.yaml")}


def test_gpu_recipe_validates_with_the_user_s_files():
    """As shipped it names the user's files (absent here), which the loader reports by name; with the sample file
    in their place it is a whole config for Qwen2.5-0.5B-Instruct from the hub on GSM8K."""
    with pytest.raises(ConfigError, match="data.train_file: no such file: data/gsm8k/train.jsonl"):
        load_config(CONFIGS / "gsm8k_gpu.yaml")
    cfg = load_config(CONFIGS / "gsm8k_gpu.yaml", [f"data.train_file={GSM8K_SAMPLE}", f"data.eval_file={GSM8K_SAMPLE}"])
    assert cfg.model.path == "Qwen/Qwen2.5-0.5B-Instruct" and cfg.data.task == "gsm8k"
    assert cfg.eval.before and cfg.eval.after and cfg.eval.every > 0 and cfg.output.dir == "runs/gsm8k_gpu"
    assert [r.name for r in cfg.rewards][0] == "answer_accuracy"


def test_gpu_recipe_runs_one_step_on_the_tiny_model(tiny_model_dir, tmp_path):
    """Not a GPU run: every knob of the recipe but the model, the files and the sizes, one step on the CPU."""
    metrics, before = run_recipe("gsm8k_gpu", tiny_model_dir, tmp_path / "gpu", f"data.train_file={GSM8K_SAMPLE}",
                                 f"data.eval_file={GSM8K_SAMPLE}")
    assert metrics[0]["step"] == 1 and metrics[0]["loss"] == metrics[0]["loss"] and "kl/mean" in metrics[0]
    assert before["metric"] == "answer_accuracy" and before["num_problems"] == 2


def test_file_recipe_reads_its_sample_files_and_no_arithmetic_field():
    """configs/files.yaml: a file task whose sample rows (text and chat prompts) ship beside it; it sets none of the
    fields a file task does not read (its comment lists them), so a copy carries nothing that silently does not apply."""
    from grpo.config import DataConfig, read_yaml

    tree = read_yaml(CONFIGS / "files.yaml")
    not_read = {"digits", "operators", "countdown_numbers", "num_train", "num_eval", "instruction", "question_column"}
    assert tree["data"]["task"] == "file" and not not_read & set(tree["data"]) and not_read <= set(DataConfig.model_fields)
    for key in ("train_file", "eval_file"):
        assert (REPO / tree["data"][key]).is_file()


def test_file_recipe_runs_through_the_cli(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the recipe names its files relative to the repository root
    metrics, before = run_recipe("files", tiny_model_dir, tmp_path / "files", "eval.num_problems=null")
    assert metrics[0]["step"] == 1 and metrics[0]["loss"] == metrics[0]["loss"]
    assert before["metric"] == "answer_accuracy" and before["num_problems"] == 8 and len(before["examples"]) == 8
    assert any(isinstance(ex["prompt"], list) for ex in before["examples"])  # a chat prompt among the samples


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_through_the_cli(name, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # examples name their reward files relative to the repository root
    metrics, before = run_recipe(name, tiny_model_dir, tmp_path / name, folder=REPO / "examples")
    cfg = load_config(REPO / "examples" / f"{name}.yaml")
    for r in cfg.rewards:
        assert f"reward/{r.metric_name}/mean" in metrics[0] and r.metric_name in before["rewards"]


# each sample file with the task and rewards it is meant for, and what eval reports as accuracy
SAMPLE_RUNS = {
    "gsm8k_sample": (["data.task=gsm8k", "rewards=[{name: answer_accuracy}, {name: format}]"], "answer_accuracy"),
    "math_sample": (["data.task=math", "rewards=[{name: math_accuracy}]"], "math_accuracy"),
    "code_sample": (["data.task=file", "rewards=[{name: code_tests}]"], None),  # no answer: reward means only
    "code_sample+metric": (["data.task=file", "rewards=[{name: code_tests}]", "eval.metric=code_tests"], "code_tests"),
}


def test_every_sample_file_has_a_run():
    assert {n.split("+")[0] for n in SAMPLE_RUNS} == {p.stem for p in SAMPLES.glob("*.jsonl")}


@pytest.mark.parametrize("name", sorted(SAMPLE_RUNS))
def test_sample_file_runs_through_the_cli(name, tiny_model_dir, tmp_path):
    overrides, metric = SAMPLE_RUNS[name]
    path = SAMPLES / f"{name.split('+')[0]}.jsonl"
    metrics, before = run_recipe(None, tiny_model_dir, tmp_path / "run", *overrides, f"data.train_file={path}", f"data.eval_file={path}")
    assert metrics[0]["step"] == 1 and before["num_problems"] == 2 and before["metric"] == metric
    assert (before["accuracy"] is None) == (metric is None)
    rewards = load_config(None, [o for o in overrides if o.startswith("rewards=")]).rewards
    assert {r.metric_name for r in rewards} == set(before["rewards"])
