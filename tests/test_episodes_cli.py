"""Environments through the command line on the tiny model: a user's environment class from a file, plain tools
from a file, the built-ins, exact resume of an episode run, and refusals before the model loads."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from test_checkpoint import BASE, assert_same_run, metrics, train

MY_ENV = '''
import grpo


class Echo(grpo.Environment):
    """Three turns; each turn's reward is the share of vowels in the model's text, the environment answers with
    a line whose length depends on the turn (its randomness is seeded per episode)."""

    stop = tuple("aeiouAEIOU0123456789")  # the random tiny model's turns end on one of these

    def __init__(self, turns: int = 3):
        self.turns = turns

    def reset(self, row, seed):
        import random

        self.turn, self.rng = 0, random.Random(seed)
        return self.prompt_messages(row)

    def step(self, text):
        self.turn += 1
        reply = "x" * self.rng.randint(1, 6)
        reward = sum(c in "aeiou" for c in text) / max(len(text), 1)
        return grpo.Step(messages=[{"role": "user", "content": reply}], reward=reward, done=self.turn >= self.turns)


class Broken(Echo):
    def step(self, text):
        raise ValueError("the environment's own bug")
'''

MY_TOOLS = '''
def shout(text: str) -> str:
    """Upper-case a text.

    Args:
        text: what to shout
    """
    return text.upper()
'''


@pytest.fixture
def files(tmp_path):
    (tmp_path / "my_env.py").write_text(MY_ENV)
    (tmp_path / "my_tools.py").write_text(MY_TOOLS)
    return tmp_path


def env_args(tiny_model_dir, files, *extra):
    return [f"model.path={tiny_model_dir}", *BASE, "rewards=[{name: environment}]", "sampling.max_new_tokens=6",
            f"environment.name={files / 'my_env.py'}:Echo", "environment.max_turns=3", *extra]


def test_a_users_environment_trains_and_resumes_exactly(tiny_model_dir, files, tmp_path):
    args = env_args(tiny_model_dir, files, "trainer.lr=1e-3")
    code, _, err = train(*args, "trainer.steps=4", f"output.dir={tmp_path / 'straight'}")
    assert code == 0, err
    lines = metrics(tmp_path / "straight")
    assert all(m["env/turns_mean"] > 1 for m in lines) and any(m["grad_norm"] > 0 for m in lines)
    sample = json.loads((tmp_path / "straight" / "samples.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in sample["episode"]["messages"][:3]] == ["user", "assistant", "user"]
    html = (tmp_path / "straight" / "report.html").read_text()
    assert 'class="episode"' in html and "turn 2 reward" in html  # the report shows whole episodes
    code, _, err = train(*args, "trainer.steps=2", f"output.dir={tmp_path / 'split'}")
    assert code == 0, err
    code, out, err = train("--resume", tmp_path / "split", "trainer.steps=4")
    assert code == 0 and "resumed from" in out, err
    assert_same_run(tmp_path / "straight", tmp_path / "split")


def test_grpo_eval_runs_and_shows_episodes(tiny_model_dir, files, tmp_path):
    from grpo.cli import main

    run = tmp_path / "run"
    code, _, err = train(*env_args(tiny_model_dir, files), "trainer.steps=1", f"output.dir={run}")
    assert code == 0, err
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["eval", str(run), "--output", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert all(ex["episode"]["messages"][0]["role"] == "user" for ex in result["examples"])
    assert "[assistant] (turn 1, reward" in out.getvalue()


def test_plain_tools_and_the_builtins_run_through_the_cli(tiny_model_dir, files, tmp_path):
    base = [f"model.path={tiny_model_dir}", *BASE, "rewards=[{name: environment}]", "sampling.max_new_tokens=6",
            "trainer.steps=2", "environment.max_turns=2"]
    for i, extra in enumerate([[f"environment.tools=[{files / 'my_tools.py'}:shout]"],
                               ["environment.name=calculator", "data.digits=2", "data.operators=['*']"],
                               ["environment.name=guess_number", "data.task=guess_number", "data.num_train=8"],
                               ["environment.name=python", "environment.args={timeout: 2}"]]):
        code, _, err = train(*base, *extra, f"output.dir={tmp_path / str(i)}")
        assert code == 0, (extra, err)
        assert [m["step"] for m in metrics(tmp_path / str(i))] == [1, 2] and "env/turns_mean" in metrics(tmp_path / str(i))[0]


def test_an_environment_that_raises_stops_the_run_naming_it(tiny_model_dir, files, tmp_path):
    args = [f"model.path={tiny_model_dir}", *BASE, "rewards=[{name: environment}]", "trainer.steps=1",
            f"environment.name={files / 'my_env.py'}:Broken", f"output.dir={tmp_path / 'run'}"]
    code, _, err = train(*args)
    assert code != 0 and "Broken" in err
    assert "the environment's own bug" in err and "row" in err and "turn 1" in err
    code, _, err = train(*args, "environment.on_error=none", "--overwrite")
    assert code == 0, err
    m = metrics(tmp_path / "run")[0]
    assert m["env/errors"] >= 1 and m["env/errors"] + 8 * m["env/truncated_frac"] == 8  # every episode that stepped


@pytest.mark.parametrize("bad, message", [
    (["environment.name=no_such_env"], "unknown environment 'no_such_env'"),
    (["environment.name=calculator", "environment.args={colour: red}"], "takes no argument 'colour'"),
    (["environment.tools=[missing.py:f]"], "missing.py"),
    (["environment.name=calculator", "environment.args={format: template}"], "template"),
])
def test_bad_environment_configs_are_refused_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch, bad,
                                                                    message):
    import grpo.models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(grpo.models, "load_model", no_loading)
    code, out, err = train(f"model.path={tiny_model_dir}", *BASE, *bad, f"output.dir={tmp_path}/r")
    assert code != 0
    assert message in err + out and "the model was loaded" not in err + out, err + out


def test_episodes_train_a_lora_policy(tiny_model_dir, files, tmp_path):
    """With LoRA only the adapters move, on the model's tokens of multi-turn episodes."""
    code, _, err = train(*env_args(tiny_model_dir, files, "lora.enabled=true", "trainer.lr=1e-2"), "trainer.steps=2",
                         f"output.dir={tmp_path / 'run'}")
    assert code == 0, err
    lines = metrics(tmp_path / "run")
    assert all(m["env/turns_mean"] > 1 for m in lines) and any(m["grad_norm"] > 0 for m in lines)
    assert (tmp_path / "run" / "model" / "adapter_config.json").is_file()


def test_the_example_environment_runs(tiny_model_dir, tmp_path, monkeypatch):
    """examples/agent.yaml (a user's environment class and a prompt file) trains a step and evaluates."""
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)  # the example's paths start at the repository root
    code, _, err = train("examples/agent.yaml", f"model.path={tiny_model_dir}", "trainer.steps=1",
                         "trainer.batch_size=8", "sampling.group_size=4", "sampling.max_new_tokens=6",
                         "eval.num_problems=2", "model.threads=1", f"output.dir={tmp_path / 'run'}")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "eval_after.json").read_text())["metric"] == "environment"
