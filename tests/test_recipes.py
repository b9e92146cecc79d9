"""Each shipped recipe runs through the real CLI on the tiny random model (1 step, tiny batch)."""

import contextlib
import io
import json
from pathlib import Path

import pytest

from grpo.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPES = ["grpo_paper", "dr_grpo", "dapo", "gspo", "process"]
TINY = [
    "trainer.steps=1", "trainer.batch_size=4", "trainer.micro_batch_size=4", "sampling.group_size=2",
    "sampling.max_new_tokens=10", "data.digits=1", "data.num_eval=4", "eval.before=false", "eval.after=false",
    "trainer.samples_per_step=2", "model.threads=null", "output.save_model=false",
]


def run_recipe(name, tiny_model_dir, out, *extra):
    from grpo.cli import main

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["train", str(CONFIGS / f"{name}.yaml"), f"model.path={tiny_model_dir}", f"output.dir={out}", *TINY, *extra])
    assert code == 0, stdout.getvalue()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_is_a_complete_config_for_the_default_model(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.model.path is None and cfg.data.task == "arithmetic"
    assert cfg.output.dir == f"runs/{name}"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_through_the_cli(name, tiny_model_dir, tmp_path):
    extra = ["algorithm.max_sampling_rounds=2"] if name == "dapo" else []
    m = run_recipe(name, tiny_model_dir, tmp_path / name, *extra)[0]
    assert m["step"] == 1 and m["loss"] == m["loss"] and m["grad_norm"] >= 0  # finite, not NaN
    cfg = load_config(CONFIGS / f"{name}.yaml")
    if cfg.algorithm.dynamic_sampling:
        assert m["dynamic_sampling/groups_kept"] + m["dynamic_sampling/groups_filled"] == 2
        assert 1 <= m["dynamic_sampling/rounds"] <= 2 and m["dynamic_sampling/groups_drawn"] >= 2
    if cfg.algorithm.advantage == "process":
        assert "advantage/steps_per_completion" in m
    if cfg.algorithm.mu == 1:
        assert m["ratio/mean"] == pytest.approx(1.0, abs=1e-6)
    assert ("kl/mean" in m) == (cfg.algorithm.beta > 0)
