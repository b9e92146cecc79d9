"""A training run end to end: run folder, models, evaluation before/after, the loop, saving."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from grpo.config import Config, dump_config
from grpo.data import load_task
from grpo.evaluate import evaluate, format_table
from grpo.logging.run import ConsoleLine, JsonlWriter, format_duration, write_json
from grpo.models import frozen_copy, load_model_and_tokenizer
from grpo.rewards import get_reward, required_columns
from grpo.rollout import make_engine
from grpo.trainer import Trainer


class RunFolderError(RuntimeError):
    pass


def prepare_run_dir(config: Config) -> Path:
    """Create the run folder; refuse to mix with an earlier run unless output.overwrite is set."""
    run_dir = Path(config.output.dir).expanduser()
    if run_dir.exists() and any(run_dir.iterdir()):
        if not config.output.overwrite:
            raise RunFolderError(
                f"run folder {run_dir} already exists and is not empty; choose another output.dir "
                "or pass --overwrite (output.overwrite=true) to replace it"
            )
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(config))
    except OSError as e:
        raise RunFolderError(f"cannot write the run folder {run_dir}: {e.strerror}") from None
    return run_dir


def needed_columns(config: Config) -> list[str]:
    cols: list[str] = []
    for r in config.rewards:
        cols += [c for c in required_columns(get_reward(r.name), r.args) if c not in cols]
    return cols


def set_threads(config: Config) -> None:
    if config.model.threads:
        torch.set_num_threads(config.model.threads)


def train(config: Config, quiet: bool = False) -> dict:
    """Run GRPO as configured; returns {"before": eval, "after": eval, "run_dir": ...}."""
    console = ConsoleLine(config.trainer.steps, quiet=quiet)
    task = load_task(config.data, needed_columns(config))  # data errors before any model loads
    run_dir = prepare_run_dir(config)
    set_threads(config)
    torch.manual_seed(config.trainer.seed)
    console.info(f"run folder: {run_dir}")
    model, tokenizer, folder = load_model_and_tokenizer(config.model, log=console.info)
    console.info(f"model: {folder} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {model.device})")
    engine = make_engine(config.sampling.engine, model, tokenizer)
    ref_model = frozen_copy(model) if config.algorithm.beta > 0 else None
    results: dict = {"run_dir": str(run_dir)}

    def run_eval(name: str):
        if not task.eval:
            return
        start = time.perf_counter()
        console.info(f"evaluating ({name}) on {config.eval.num_problems or len(task.eval)} held-out problems ...")
        results[name] = evaluate(model, tokenizer, engine, task.eval, config)
        write_json(run_dir / f"eval_{name}.json", results[name])
        console.info(f"  accuracy {results[name]['accuracy']:.3f} ({time.perf_counter() - start:.0f} s)")

    if config.eval.before:
        run_eval("before")
    trainer = Trainer(config, model, tokenizer, engine, task.train, ref_model=ref_model)
    metrics_log, samples_log = JsonlWriter(run_dir / "metrics.jsonl"), JsonlWriter(run_dir / "samples.jsonl")
    console.start = time.perf_counter()
    for _ in range(config.trainer.steps):
        m, batch = trainer.step()
        metrics_log.write(m)
        for record in trainer.sample_records(batch, config.trainer.samples_per_step):
            samples_log.write(record)
        console.step(trainer.step_count, m)
    metrics_log.close()
    samples_log.close()
    console.info(f"trained {config.trainer.steps} steps in {format_duration(time.perf_counter() - console.start)}")
    if config.output.save_model:
        model.save_pretrained(run_dir / "model")
        tokenizer.save_pretrained(run_dir / "model")
        console.info(f"saved the model to {run_dir / 'model'}")
    if config.eval.after:
        run_eval("after")
    evals = {k: results[k] for k in ("before", "after") if k in results}
    if evals:
        console.info("\nheld-out evaluation\n" + format_table(evals))
    return results


def eval_only(config: Config, model_path: str | None, output: Path | None, quiet: bool = False) -> dict:
    console = ConsoleLine(1, quiet=quiet)
    task = load_task(config.data, needed_columns(config))
    set_threads(config)
    cfg = config.model_copy(update={"model": config.model.model_copy(update={"path": model_path})}) if model_path else config
    model, tokenizer, folder = load_model_and_tokenizer(cfg.model, log=console.info)
    engine = make_engine(config.sampling.engine, model, tokenizer)
    console.info(f"evaluating {folder} on {config.eval.num_problems or len(task.eval)} held-out problems ...")
    result = evaluate(model, tokenizer, engine, task.eval, config)
    result["model"] = str(folder)
    if output:
        write_json(output, result)
    console.info(format_table({"eval": result}))
    return result
