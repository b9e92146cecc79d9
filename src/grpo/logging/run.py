"""The run folder's files: metrics.jsonl, samples.jsonl, TensorBoard events, optional Weights &
Biases, JSON results, and the HTML report refreshed during the run (RunLog fans a step out to all)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

from grpo.files import write_text_atomic
from grpo.logging.console import ConsoleLine, format_duration  # noqa: F401  (their earlier home)


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN; a missing value reads as null
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    return v


class JsonlWriter:
    """Appends one JSON object a line, flushed at once so a killed run keeps every line written."""

    def __init__(self, path: Path):
        self.path = path
        self._f = path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def write_json(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


class RunLog:
    """Where each step's metrics and samples go (docs/algorithm.md section 5): metrics.jsonl, samples.jsonl every
    trainer.samples_every steps, TensorBoard events in <run>/tensorboard, Weights & Biases when asked
    for, and <run>/report.html rewritten every output.report_every steps and on close."""

    def __init__(self, run_dir: Path, config, info: Callable[[str], None] = print, purge_step: int | None = None):
        """purge_step: a resumed run's first step; TensorBoard hides the earlier events from that step on."""
        self.run_dir, self.cfg, self.info = Path(run_dir), config, info
        self.metrics = JsonlWriter(self.run_dir / "metrics.jsonl")
        self.samples = JsonlWriter(self.run_dir / "samples.jsonl")
        self.tb = tensorboard_writer(self.run_dir / "tensorboard", info, purge_step) if config.output.tensorboard else None
        self.wandb = start_wandb(config, self.run_dir, info) if config.output.wandb else None
        self.refresh_report()

    def step(self, step: int, metrics: dict, samples: Callable[[], list[dict]]) -> None:
        """Log one step; `samples` is called only on the steps whose completions are written."""
        self.metrics.write(metrics)
        scalars = {k: float(v) for k, v in metrics.items() if k != "step" and _is_number(v)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        t = self.cfg.trainer
        if t.samples_per_step and (step % t.samples_every == 0 or step == t.steps):
            for record in samples():
                self.samples.write(record)
        every = self.cfg.output.report_every
        if every and step % every == 0:
            self.refresh_report()

    def refresh_report(self) -> Path | None:
        """Rewrite report.html; a failure is reported and never stops training."""
        from grpo.report import write_report

        try:
            return write_report(self.run_dir)
        except Exception as e:  # noqa: BLE001  (the report is a view; training matters more)
            self.info(f"warning: could not write {self.run_dir / 'report.html'}: {type(e).__name__}: {e}")
            return None

    def close(self) -> Path | None:
        self.metrics.close()
        self.samples.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        return self.refresh_report()


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def tensorboard_writer(folder: Path, info: Callable[[str], None] = print, purge_step: int | None = None):
    """torch's SummaryWriter on `folder` (needs the tensorboard package; without it: a message, no events)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        info("note: TensorBoard events skipped: the tensorboard package is not installed (pip install tensorboard)")
        return None
    return SummaryWriter(log_dir=str(folder), purge_step=purge_step)


def start_wandb(config, run_dir: Path, info: Callable[[str], None] = print):
    """A Weights & Biases run for output.wandb=true, or None with a message when wandb is not installed."""
    try:
        import wandb
    except ImportError:
        info("note: output.wandb=true but Weights & Biases is not installed (pip install wandb); logging to the run folder only")
        return None
    return wandb.init(
        project=config.output.wandb_project, name=run_dir.name, dir=str(run_dir), config=config.model_dump(mode="json")
    )
