"""A training run end to end: run folder, models, evaluation before/after, the loop, saving."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from grpo.config import Config, dump_config
from grpo.data import load_task
from grpo.evaluate import evaluate, format_table
from grpo.logging.console import format_duration, make_console
from grpo.logging.run import RunLog, write_json
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
    """Dataset columns the configured rewards take (their parameters without a default)."""
    cols: list[str] = []
    for r in config.rewards:
        cols += [c for c in required_columns(get_reward(r.name), r.args) if c not in cols]
    return cols


def set_threads(config: Config) -> None:
    if config.model.threads:
        torch.set_num_threads(config.model.threads)


def train(config: Config, quiet: bool = False, console_mode: str = "auto") -> dict:
    """Run GRPO as configured; returns {"before": eval, "after": eval, "run_dir": ...}."""
    console = make_console("quiet" if quiet else console_mode, config.trainer.steps)
    task = load_task(config.data, needed_columns(config))  # data errors before any model loads
    run_dir = prepare_run_dir(config)
    set_threads(config)
    torch.manual_seed(config.trainer.seed)
    console.info(f"run folder: {run_dir}")
    with console.phase("loading the model"):
        model, tokenizer, folder = load_model_and_tokenizer(config.model, log=console.info)
    console.info(f"model: {folder} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {model.device})")
    engine = make_engine(config.sampling.engine, model, tokenizer)
    ref_model = frozen_copy(model) if config.algorithm.beta > 0 else None
    results: dict = {"run_dir": str(run_dir)}

    def run_eval(name: str):
        if not task.eval:
            return
        start, n = time.perf_counter(), min(config.eval.num_problems or len(task.eval), len(task.eval))
        with console.progress(f"evaluating ({name}) on {n} held-out problems", n) as update:
            results[name] = evaluate(model, tokenizer, engine, task.eval, config, progress=update)
        write_json(run_dir / f"eval_{name}.json", results[name])
        console.info(f"  accuracy {results[name]['accuracy']:.3f} ({time.perf_counter() - start:.0f} s)")

    log = RunLog(run_dir, config, console.info)  # metrics, samples, TensorBoard, report.html
    try:
        if config.eval.before:
            run_eval("before")
        trainer = Trainer(config, model, tokenizer, engine, task.train, ref_model=ref_model)
        with console.training():
            for _ in range(config.trainer.steps):
                m, batch = trainer.step()
                log.step(trainer.step_count, m, lambda: trainer.sample_records(batch, config.trainer.samples_per_step))
                console.step(trainer.step_count, m)
        console.info(f"trained {config.trainer.steps} steps in {format_duration(time.perf_counter() - console.start)}")
        if config.output.save_model:
            model.save_pretrained(run_dir / "model")
            tokenizer.save_pretrained(run_dir / "model")
            console.info(f"saved the model to {run_dir / 'model'}")
        if config.eval.after:
            run_eval("after")
    finally:
        report = log.close()  # the report also covers a run that stopped early
    evals = {k: results[k] for k in ("before", "after") if k in results}
    if evals:
        console.info("\nheld-out evaluation\n" + format_table(evals))
    if report:
        console.info(f"report: {report}")
    return results


def eval_only(config: Config, model_path: str | None, output: Path | None, quiet: bool = False, console_mode: str = "auto") -> dict:
    console = make_console("quiet" if quiet else console_mode, 1)
    task = load_task(config.data, needed_columns(config))
    set_threads(config)
    cfg = config.model_copy(update={"model": config.model.model_copy(update={"path": model_path})}) if model_path else config
    with console.phase("loading the model"):
        model, tokenizer, folder = load_model_and_tokenizer(cfg.model, log=console.info)
    engine = make_engine(config.sampling.engine, model, tokenizer)
    n = min(config.eval.num_problems or len(task.eval), len(task.eval))
    with console.progress(f"evaluating {folder} on {n} held-out problems", n) as update:
        result = evaluate(model, tokenizer, engine, task.eval, config, progress=update)
    result["model"] = str(folder)
    if output:
        write_json(output, result)
    console.info(format_table({"eval": result}))
    return result
