"""Multi-turn episodes under torchrun (gloo, 2 ranks, one thread each): episodes end at different turns on each rank
and their transcripts have different lengths, yet every collective stays aligned and the run is the one-process
run (episodes are seeded per group, so either world size plays the same ones)."""

import pytest

from test_distributed import RUN, assert_same_run, grpo, metrics
from test_episodes_cli import MY_ENV


@pytest.fixture(scope="module")
def env_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("env") / "my_env.py"
    path.write_text(MY_ENV)
    return path


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_episodes_on_two_ranks_match_one_process(tiny_model_dir, env_file, tmp_path, parallel):
    common = [f"model.path={tiny_model_dir}", *RUN, "trainer.steps=2", "rewards=[{name: environment}]",
              f"environment.name={env_file}:Echo", "environment.max_turns=3", f"trainer.parallel={parallel}",
              "eval.before=false", "eval.after=false"]
    one = grpo("train", *common, f"output.dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    two = grpo("train", *common, f"output.dir={tmp_path / 'two'}", nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_run(tmp_path / "one", tmp_path / "two")
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two")):
        assert a["env/turns_max"] > a["env/turns_mean"] > 1  # episodes of different lengths
        assert {k: v for k, v in a.items() if k.startswith("env/")} == {k: v for k, v in b.items()
                                                                          if k.startswith("env/")}
