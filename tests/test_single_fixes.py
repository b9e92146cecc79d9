"""Issue 27, single process: a checkpoint before the first update resumes exactly (AdamW's state untouched by the
save); extending a run keeps the learning rate continuous; the hf engine samples with the run's `sampling` section
only; the sampler's log-probs are the policy's tempered ones, so a truncating sampler's TIS ratio is 1."""

import json
import math
import warnings

import pytest
import torch

from grpo import checkpoint
from grpo.trainer import Trainer
from test_checkpoint import BASE, VOWELS, assert_same_run, metrics, train
from trainer_helpers import make_trainer


@pytest.fixture
def args(tiny_model_dir, tmp_path):
    (tmp_path / "rw.py").write_text(VOWELS)
    rewards = f"rewards=[{{name: answer_accuracy}}, {{name: '{tmp_path}/rw.py:vowels', weight: 0.1}}]"
    return [f"model.path={tiny_model_dir}", *BASE, rewards]


# --- 7. a checkpoint before the first update ------------------------------------------------------


def test_saving_a_fresh_optimizer_leaves_it_fresh():
    trainer = make_trainer("algorithm.beta=0")
    state = trainer.state_dict()
    assert not trainer.optimizer.state  # AdamW still holds no step count and no moments
    assert state["optimizer"]["state"] == {} and state["optimizer"]["param_groups"][0]["lr"] == trainer.cfg.trainer.lr
    trainer.load_state_dict(state)
    assert not trainer.optimizer.state


def test_a_sharded_checkpoint_before_the_first_update_keeps_and_restores_a_fresh_optimizer(tmp_path):
    """The same for the checkpoint several ranks write (torch.distributed.checkpoint; one process writes and reads
    it here): the save leaves AdamW fresh, the restore gives a fresh AdamW at the saved learning rate; after an
    update the state round-trips."""
    trainer = make_trainer("algorithm.beta=0", "trainer.warmup_steps=3")
    advance(trainer, 1)  # a step the guard skipped: the schedule moved on, AdamW did not
    folder = tmp_path / "fresh"
    folder.mkdir()
    checkpoint.write_sharded(folder, trainer.cfg, trainer)
    assert not trainer.optimizer.state
    restored = make_trainer("algorithm.beta=0", "trainer.warmup_steps=3")
    checkpoint.restore_sharded(checkpoint.Checkpoint(folder, 1), restored)
    assert not restored.optimizer.state and restored.optimizer.param_groups[0]["lr"] == 2 / 4 * 1e-6
    trainer.step()  # a real update
    folder = tmp_path / "updated"
    folder.mkdir()
    checkpoint.write_sharded(folder, trainer.cfg, trainer)
    restored = make_trainer("algorithm.beta=0", "trainer.warmup_steps=3")
    checkpoint.restore_sharded(checkpoint.Checkpoint(folder, 2), restored)
    want, got = trainer.optimizer.state_dict(), restored.optimizer.state_dict()
    assert int(got["state"][0]["step"]) == 1 and got["param_groups"][0]["lr"] == want["param_groups"][0]["lr"]
    assert all(torch.equal(want["state"][i][k], got["state"][i][k]) for i in want["state"] for k in want["state"][i])


@pytest.fixture
def first_step_skipped(monkeypatch):
    """The guard skips the first step's update (as for a reward that returns NaN on step 1 only)."""
    clip = Trainer.clip_and_step

    def bad_first_step(self, loss=None, bad_reward=None):
        return clip(self, loss, "a bad first step (test)" if self.step_count == 0 else bad_reward)

    monkeypatch.setattr(Trainer, "clip_and_step", bad_first_step)


def test_a_checkpoint_before_the_first_update_resumes_exactly(args, tmp_path, first_step_skipped):
    straight, split = tmp_path / "straight", tmp_path / "split"
    code, _, err = train(*args, "trainer.steps=3", "output.checkpoint_every=0", f"output.dir={straight}")
    assert code == 0, err
    assert [m["guard/skipped"] for m in metrics(straight)] == [1, 0, 0]
    code, _, err = train(*args, "trainer.steps=3", "output.checkpoint_every=1", f"output.dir={split}",
                         "output.keep_checkpoints=3")
    assert code == 0, err
    assert_same_run(straight, split)  # saving after every step changed nothing
    saved = torch.load(split / "checkpoints" / "step-000001" / "trainer.pt", weights_only=False)
    assert saved["optimizer"]["state"] == {}  # no update yet: nothing but hyperparameters
    for c in checkpoint.list_checkpoints(split)[1:]:  # resume from step 1, as if it were the last checkpoint
        c.path.rename(c.path.with_name(".gone-" + c.path.name))
    (split / "model").rename(split / "model-first")
    code, _, err = train("--resume", split, "trainer.steps=3")
    assert code == 0, err
    assert_same_run(straight, split)  # bitwise


# --- 8. extending a run: the learning rate goes on from where it was ---------------------------------


def cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def advance(trainer, updates: int) -> list[float]:
    """The learning rates of the next `updates` optimizer steps (the scheduler alone, no update)."""
    lrs = []
    for _ in range(updates):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": no update is wanted
            warnings.simplefilter("ignore", UserWarning)
            trainer.scheduler.step()
    return lrs


def test_extending_a_cosine_run_keeps_the_learning_rate_continuous():
    """10 updates planned, 4 done, extended to 20: the cosine goes on from progress 0.4 at update 4 to 1 at
    update 20, linearly in the updates (not restarted over 20, which would jump from 0.65 lr up to 0.90 lr)."""
    common = ["algorithm.beta=0", "trainer.lr=1.0", "trainer.lr_schedule=cosine", "trainer.warmup_steps=2"]
    first = make_trainer(*common, "trainer.steps=10")
    done = advance(first, 4)
    assert done == pytest.approx([1 / 3, 2 / 3, cosine(0.0), cosine(1 / 8)], rel=0, abs=1e-12)
    state = first.state_dict()
    extended = make_trainer(*common, "trainer.steps=20")
    extended.load_state_dict(state)
    lrs = advance(extended, 17)
    start = 2 / 8  # the cosine's progress at update 4: (4 - 2 warmup) / (10 - 2)
    want = [cosine(start + (1 - start) * (s - 4) / 16) for s in range(4, 21)]
    assert lrs == pytest.approx(want, rel=0, abs=1e-12)
    assert lrs[0] == first.optimizer.param_groups[0]["lr"] and lrs[-1] == 0.0  # continuous; 0 at the new end
    assert extended.schedule_note is None  # far from 0: nothing to warn about
    again = make_trainer(*common, "trainer.steps=20")  # a second resume, from a checkpoint of the extended run
    resumed = make_trainer(*common, "trainer.steps=20")
    resumed.load_state_dict(state)
    advance(resumed, 6)
    again.load_state_dict(resumed.state_dict())  # the checkpoint holds the extended schedule
    assert advance(again, 11) == pytest.approx(want[6:], rel=0, abs=1e-12)


def test_extending_a_finished_cosine_run_warns_that_it_trains_at_lr_zero(args, tmp_path):
    run = tmp_path / "r"
    code, _, err = train(*args, "trainer.steps=2", "trainer.lr_schedule=cosine", f"output.dir={run}")
    assert code == 0, err
    code, out, err = train("--resume", run, "trainer.steps=4")
    assert code == 0, err
    assert [m["lr"] for m in metrics(run)] == [1e-3, 0.5e-3, 0.0, 0.0]  # not a cosine restarted over 4 steps
    assert "warning: the cosine learning-rate schedule had reached 0" in out
    assert "goes on from there to 0 at step 4" in out and "model.path=<run>/model" in out


# --- 10. the hf engine samples with the run's `sampling` section only ---------------------------------

FOLDER_GENERATION_CONFIG = {  # what a model folder may ask generate for (Qwen2.5-Instruct: the first three)
    "do_sample": True, "temperature": 0.3, "top_k": 3, "top_p": 0.5, "min_p": 0.2, "repetition_penalty": 1.8,
    "no_repeat_ngram_size": 1, "min_new_tokens": 6, "suppress_tokens": [40, 41, 42], "bos_token_id": 2,
    "eos_token_id": 3, "pad_token_id": 1,
}


def test_the_hf_engine_ignores_the_folders_generation_config(tmp_path):
    """The same seeds sample the same tokens from a folder whose generation_config.json asks for a repetition
    penalty, top-k, top-p, ... and from one without; every reported log-prob is the policy's own at the run's
    temperature; and tokens outside the policy's top 50 are drawn (no transformers default top_k=50 either)."""
    from grpo.models import load_model_and_tokenizer
    from grpo.config import ModelConfig
    from grpo.rollout import HFGenerateEngine, SamplingParams
    from grpo.testing import save_tiny_model
    from rollout_helpers import reference_logprobs, rows_as_lists

    plain = save_tiny_model(tmp_path / "plain")
    folder = save_tiny_model(tmp_path / "configured")
    (folder / "generation_config.json").write_text(json.dumps(FOLDER_GENERATION_CONFIG))
    params = SamplingParams(max_new_tokens=10, temperature=0.7)
    rollouts = []
    for path in (folder, plain):
        model, tok, _ = load_model_and_tokenizer(ModelConfig(path=str(path), device="cpu"))
        prompts = [tok("2+2=").input_ids, tok("hello there").input_ids]
        rollouts.append(HFGenerateEngine(model, tok).generate(prompts, 4, params, seeds=[11, 12]))
        if path == folder:
            assert model.generation_config.top_k == 3  # the folder's config was read
    configured, reference = rollouts
    outside_top_50 = 0
    for n, row in enumerate(rows_as_lists(configured)):
        want = reference_logprobs(model, prompts[n // 4], row, 0.7)
        torch.testing.assert_close(configured.sampling_logprobs[n, : len(row)], want, rtol=0, atol=1e-5)
        with torch.no_grad():
            p = prompts[n // 4]
            logits = model(torch.tensor([p + row])).logits[0, len(p) - 1 : len(p) + len(row) - 1]  # [T, V]
        rank = (logits > logits.gather(1, torch.tensor(row).unsqueeze(1))).sum(dim=1)  # [T] tokens ranked above
        outside_top_50 += int((rank >= 50).sum())
    assert torch.equal(configured.completion_ids, reference.completion_ids)
    assert outside_top_50 > 0


# --- 11. truncated importance sampling with a truncating sampler -------------------------------------


@pytest.mark.parametrize("engine", ["hf", "fast"])
@pytest.mark.parametrize("truncation", ["sampling.top_k=5", "sampling.top_p=0.5", "sampling.min_p=0.5"])
def test_tis_weights_are_one_when_a_truncating_sampler_is_the_policy(engine, truncation):
    """top-k / top-p / min-p pick the tokens; the sampler's log-probs stay the policy's tempered ones, so with the
    policy unchanged pi_old / pi_sampler is 1 (not the kept probability mass, TRL #6789)."""
    from grpo.logging.metrics import Phases
    from grpo.rollout import FastEngine

    trainer = make_trainer("algorithm.beta=0", "algorithm.tis_cap=2", "sampling.temperature=0.8", truncation)
    if engine == "fast":
        trainer.engine = FastEngine(trainer.model, trainer.tokenizer)
    batch = trainer.make_batch(trainer.sampler.next(2), Phases())
    sums = trainer.accumulate_gradients(batch, compare_rollout=True)
    assert sums["tis_weight"] == pytest.approx(1.0, rel=0, abs=1e-5)  # mean over the loss tokens
    assert sums["rollout_logprob_diff"] < 1e-5
    old = trainer.fixed_logprobs(trainer.policy, batch.sequences)  # [N, T] pi_old as the trainer computes it
    mask = batch.rollout.completion_mask
    assert ((old - batch.rollout.sampling_logprobs).abs() * mask).max() < 1e-5  # every token's ratio is 1


def test_tis_with_a_truncating_vllm_sampler_is_refused(monkeypatch):
    """vLLM reports the truncated distribution's log-probs: tis_cap with its top-k/top-p/min-p is refused."""
    import importlib.util

    from grpo.config import ConfigError, load_config

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else find_spec(name, *a))
    for truncation in ("sampling.top_k=50", "sampling.top_p=0.9", "sampling.min_p=0.1"):
        with pytest.raises(ConfigError, match=r"algorithm\.tis_cap with sampling\.engine=vllm.*tis_cap=null"):
            load_config(None, ["sampling.engine=vllm", "algorithm.tis_cap=2", truncation])
    load_config(None, ["sampling.engine=vllm", "algorithm.tis_cap=2"])  # whole distribution: fine
    load_config(None, ["sampling.engine=fast", "algorithm.tis_cap=2", "sampling.top_k=50"])  # reports the whole one


# --- 9. ref_reset_steps with LoRA ----------------------------------------------------------------------


def test_ref_reset_steps_with_lora_is_refused_naming_both_fields():
    from grpo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"algorithm\.ref_reset_steps .*lora\.enabled.*ref_reset_steps=null"):
        load_config(None, ["lora.enabled=true", "algorithm.ref_reset_steps=2"])


def test_a_trainer_refuses_ref_reset_steps_it_cannot_honour():
    """A config changed after it was read (library use) reaches the Trainer: it refuses instead of never resetting."""
    from grpo.data.arithmetic import arithmetic_rows
    from grpo.config import load_config
    from grpo.models import apply_lora
    from grpo.rollout import FastEngine
    from grpo.run import build_trainer
    from grpo.testing import tiny_model_and_tokenizer

    cfg = load_config(None, ["lora.enabled=true", "lora.r=4", "trainer.batch_size=8", "sampling.group_size=4"])
    cfg.algorithm.ref_reset_steps = 2  # validated alone: the LoRA check is the whole config's
    base, tok = tiny_model_and_tokenizer(seed=0)
    model = apply_lora(base, cfg.lora)
    rows, _ = arithmetic_rows(1, ["+"], 40, 10, "{question}", seed=0)
    with pytest.raises(ValueError, match=r"algorithm\.ref_reset_steps needs a reference model.*ref_reset_steps=null"):
        build_trainer(cfg, model, tok, FastEngine(model, tok), rows, ref_model=None)
