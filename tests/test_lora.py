"""LoRA through peft: only the adapters train, the reference is the base model with the adapters off (no
copy), the saved adapter loads back with peft and with `grpo eval`, merged weights on request, exact resume."""

import copy

import pytest
import torch
from peft import PeftModel

from grpo.checkpoint import save_policy
from grpo.config import ConfigError, load_config
from grpo.backend.cpu_fast import completion_logprobs
from grpo.data.arithmetic import arithmetic_rows
from grpo.models import ModelError, apply_lora, is_lora, load_model_and_tokenizer, lora_dropout
from grpo.rollout import FastEngine, LogprobKind, SamplingParams as Params
from grpo.run import build_trainer
from grpo.testing import tiny_model_and_tokenizer

from test_checkpoint import BASE, metrics, train


def lora_trainer(*overrides):
    cfg = load_config(None, [
        "lora.enabled=true", "lora.r=4", "lora.alpha=8", "trainer.batch_size=8", "sampling.group_size=4",
        "trainer.micro_batch_size=3", "sampling.max_new_tokens=10", "data.digits=1", "data.num_eval=10",
        "trainer.lr=1e-2", "algorithm.beta=0.04", "trainer.seed=0", "rewards=[{name: length, args: {target: 5}}]",
        *overrides,
    ])
    base, tok = tiny_model_and_tokenizer(seed=0)
    original = copy.deepcopy(base)
    model = apply_lora(base, cfg.lora)
    rows, _ = arithmetic_rows(1, ["+"], 40, 10, "{question}", seed=0)
    return build_trainer(cfg, model, tok, FastEngine(model, tok), rows, ref_model=None), original


def named(model, lora: bool) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters() if ("lora_" in k) == lora}


def test_only_adapters_change_and_the_reference_is_the_base_model():
    trainer, original = lora_trainer()
    base_before, lora_before = named(trainer.model, False), named(trainer.model, True)
    assert not any(p.requires_grad for k, p in trainer.model.named_parameters() if 'lora_' not in k)
    for _ in range(2):
        metrics_, batch = trainer.step()
    assert metrics_["kl/mean"] > 0  # the policy moved away from its base
    base_after, lora_after = named(trainer.model, False), named(trainer.model, True)
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)  # bitwise
    assert any(not torch.equal(lora_before[k], lora_after[k]) for k in lora_before)
    with torch.no_grad():
        expected, _ = completion_logprobs(original, batch.sequences)
    torch.testing.assert_close(trainer.reference_logprobs(batch.sequences), expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        policy, _ = completion_logprobs(trainer.model, batch.sequences)
    assert (policy - expected).abs().max() > 1e-3  # the adapters are on outside the reference pass


def test_the_update_is_the_same_with_gradient_checkpointing():
    plain, _ = lora_trainer()
    recompute, _ = lora_trainer("trainer.gradient_checkpointing=true")
    plain.step()
    recompute.step()
    a, b = named(plain.model, True), named(recompute.model, True)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)


def test_saved_adapter_loads_back_with_peft_and_gives_the_same_outputs(tmp_path):
    trainer, _ = lora_trainer()
    trainer.step()
    save_policy(trainer.model, trainer.tokenizer, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()  # the adapter only
    base, _ = tiny_model_and_tokenizer(seed=0)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = torch.tensor([[5, 9, 30, 41, 17, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trainer.model(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_lora_dropout_is_on_only_in_the_training_forward():
    trainer, _ = lora_trainer("lora.dropout=0.5")
    drop = [m for n, m in trainer.model.named_modules() if n.endswith("lora_dropout.default")]
    assert drop and not any(m.training for m in drop)
    with lora_dropout(trainer.model):
        assert all(m.training for m in drop)
    assert not any(m.training for m in drop)


def test_lora_config_errors_name_the_field(tiny_model_dir):
    with pytest.raises(ConfigError, match="ref_reset_steps"):
        load_config(None, ["lora.enabled=true", "algorithm.ref_reset_steps=2"])
    with pytest.raises(ConfigError, match=r"lora\.r"):
        load_config(None, ["lora.r=0"])
    base, _ = tiny_model_and_tokenizer()
    cfg = load_config(None, ["lora.enabled=true", "lora.target_modules=[no_such_proj]"])
    with pytest.raises(ModelError, match=r"lora\.target_modules"):
        apply_lora(base, cfg.lora)


def test_lora_run_saves_adapter_and_merged_model_and_eval_loads_the_adapter(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    code, out, err = train(f"model.path={tiny_model_dir}", *BASE, "trainer.steps=2", "lora.enabled=true",
                           "lora.save_merged=true", f"output.dir={run}")
    assert code == 0, err
    assert (run / "model" / "adapter_config.json").is_file() and (run / "model-merged" / "config.json").is_file()
    cfg = load_config(None, [f"model.path={run / 'model'}", "model.device=cpu"])
    adapter_model, tok, folder = load_model_and_tokenizer(cfg.model, log=lambda *_: None)
    assert is_lora(adapter_model) and folder == run / "model"
    merged_cfg = load_config(None, [f"model.path={run / 'model-merged'}", "model.device=cpu"])
    merged, _, _ = load_model_and_tokenizer(merged_cfg.model, log=lambda *_: None)
    ids = torch.tensor([[5, 9, 30, 41, 17, 3]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapter_model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    from grpo.cli import main

    assert main(["eval", str(run), "--quiet", "eval.num_problems=2"]) == 0


def test_lora_resume_is_exact(tiny_model_dir, tmp_path):
    argv = [f"model.path={tiny_model_dir}", *BASE, "lora.enabled=true", "lora.r=4"]
    code, _, err = train(*argv, "trainer.steps=4", f"output.dir={tmp_path / 'straight'}")
    assert code == 0, err
    code, _, err = train(*argv, "trainer.steps=2", f"output.dir={tmp_path / 'split'}")
    assert code == 0, err
    code, out, err = train("--resume", tmp_path / "split", "trainer.steps=4")
    assert code == 0, err
    assert "resumed from" in out
    assert metrics(tmp_path / "straight") == metrics(tmp_path / "split")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "straight" / "model" / "adapter_model.safetensors")
    b = load_file(tmp_path / "split" / "model" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_merged_sampling_copy_samples_the_lora_policy_after_every_update():
    """sampling.dtype with LoRA: the engine decodes with a plain copy that has the adapters merged in, which
    the trainer refreshes after every update (engine.sync_weights); greedy tokens and log-probs match
    sampling with the peft model itself."""
    trainer, _ = lora_trainer()
    plain = FastEngine(trainer.model, trainer.tokenizer)
    merged = FastEngine(trainer.model, trainer.tokenizer, dtype="float32")
    trainer.engine = merged  # the trainer samples from, and syncs, the copy
    params = Params(max_new_tokens=8)
    assert merged.logprob_kind(params) is LogprobKind.POLICY and merged.runner is not trainer.model
    prompts = [trainer.tokenizer("12+7=").input_ids, trainer.tokenizer("3-1=").input_ids]
    greedy = Params(max_new_tokens=8, temperature=0)
    for _ in range(2):
        trainer.step()  # the adapters move; the merged copy must follow
        a, b = plain.generate(prompts, 2, greedy), merged.generate(prompts, 2, greedy)
        assert torch.equal(a.completion_ids, b.completion_ids)
        torch.testing.assert_close(b.sampling_logprobs, a.sampling_logprobs, rtol=0, atol=1e-5)
    bf16 = FastEngine(trainer.model, trainer.tokenizer, dtype="bfloat16")
    assert bf16.logprob_kind(params) is LogprobKind.OTHER


@pytest.mark.slow
def test_lora_on_the_default_model_through_the_cli(tmp_path):
    """One LoRA step on the real SmolLM2-135M: the adapter is saved and loads back for eval."""
    run = tmp_path / "run"
    code, _, err = train("trainer.steps=1", "trainer.batch_size=4", "sampling.group_size=2",
                         "sampling.max_new_tokens=8", "data.digits=1", "data.num_eval=4", "eval.before=false",
                         "eval.after=false", "output.tensorboard=false", "output.report_every=0", "model.threads=2",
                         "lora.enabled=true", "sampling.engine=fast", "sampling.dtype=float32", f"output.dir={run}")
    assert code == 0, err
    assert metrics(run)[0]["rollout/logprob_diff"] < 1e-3  # the merged sampling copy is the peft policy
    assert (run / "model" / "adapter_model.safetensors").is_file()
    cfg = load_config(None, [f"model.path={run / 'model'}", "model.device=cpu"])
    model, _, _ = load_model_and_tokenizer(cfg.model, log=lambda *_: None)
    assert is_lora(model)
