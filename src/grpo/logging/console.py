"""What a run prints: a live progress display on a terminal, one plain line per step in logs and
pipes, one JSON object per step for scripts, or nothing.

Every console has the same few verbs:
    info(text)                       a message line
    result(text)                     what the command was run for (a table): shown even when quiet
    phase(text)                      context manager around a long step with no count (model conversion)
    progress(text, total)            context manager yielding update(done, total) (evaluation)
    training()                       context manager around the training loop
    step(step, metrics)              one finished training step

`make_console("auto", ...)` picks the live display when stdout is a terminal and plain lines
otherwise, so CI logs get one line per step, never progress-bar redraws.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import contextmanager
from typing import Literal

ConsoleMode = Literal["auto", "live", "plain", "jsonl", "quiet"]
CONSOLE_MODES: tuple[str, ...] = ("auto", "live", "plain", "jsonl", "quiet")


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def step_stats(m: dict) -> list[str]:
    """The numbers worth watching in one step: reward, accuracy, KL, length, time, speed, memory (the step's
    peak on a GPU, the process's peak resident memory on a CPU)."""
    parts = [f"reward {m['reward/mean']:.3f}±{m['reward/std']:.2f}"]
    if "reward/answer_accuracy/mean" in m:
        parts.append(f"acc {m['reward/answer_accuracy/mean']:.2f}")
    if "kl/mean" in m:
        parts.append(f"kl {m['kl/mean']:.4f}")
    parts += [
        f"len {m['completion/length_mean']:.1f}",
        f"{m['time/step']:.1f}s (gen {m['time/generate']:.1f} train {m['time/train']:.1f})",
        f"{m['throughput/tokens_per_s']:.0f} tok/s",
    ]
    memory = m.get("memory/cuda_peak_gib", m.get("memory/peak_rss_gib"))  # what running out of memory goes by
    if memory is not None:
        parts.append(f"mem {memory:.1f}G")
    return parts


class PlainConsole:
    """One readable line per step: progress, reward, accuracy, KL, length, speed, time left."""

    def __init__(self, total_steps: int, stream=None, quiet: bool = False):
        self.total, self._stream, self.quiet = total_steps, stream, quiet
        self.start = time.perf_counter()

    @property
    def stream(self):
        return self._stream or sys.stdout  # looked up late, so redirected stdout is honoured

    def info(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.stream, flush=True)

    def result(self, text: str) -> None:
        """What the command was run for (grpo eval's table): printed in every mode, --quiet included."""
        quiet, self.quiet = self.quiet, False
        try:
            self.info(text)
        finally:
            self.quiet = quiet

    @contextmanager
    def phase(self, text: str):
        self.info(f"{text} ...")
        yield

    @contextmanager
    def progress(self, text: str, total: int):
        self.info(f"{text} ...")
        yield lambda done, total=total: None

    @contextmanager
    def training(self):
        self.start = time.perf_counter()
        yield

    def step(self, step: int, m: dict) -> None:
        if self.quiet:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / step * (self.total - step)
        line = [f"step {step:>{len(str(self.total))}}/{self.total}", *step_stats(m), f"{format_duration(elapsed)}<{format_duration(eta)}"]
        print(" | ".join(line), file=self.stream, flush=True)


ConsoleLine = PlainConsole  # the earlier name


class JsonlConsole(PlainConsole):
    """For scripts: stdout carries exactly one JSON object per training step; messages go to stderr."""

    def __init__(self, total_steps: int, stream=None, err=None):
        super().__init__(total_steps, stream)
        self._err = err

    def info(self, text: str) -> None:
        print(text, file=self._err or sys.stderr, flush=True)

    def step(self, step: int, m: dict) -> None:
        record = {k: (v if not (isinstance(v, float) and not math.isfinite(v)) else None) for k, v in m.items()}
        print(json.dumps({"step": step, **record}), file=self.stream, flush=True)


class LiveConsole(PlainConsole):
    """A terminal display (rich): a progress bar with elapsed and remaining time and the latest
    step's numbers, each finished step printed above it; spinners and bars for long phases."""

    def __init__(self, total_steps: int, stream=None):
        from rich.console import Console

        super().__init__(total_steps, stream)
        self.rich = Console(file=stream, highlight=False)
        self._bar = None

    def info(self, text: str) -> None:
        self.rich.print(text, markup=False)

    def _progress(self, *columns, transient: bool):
        from rich.progress import Progress

        return Progress(*columns, console=self.rich, transient=transient, refresh_per_second=4)

    @contextmanager
    def phase(self, text: str):
        from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

        start = time.perf_counter()
        with self._progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True) as p:
            p.add_task(text, total=None)
            yield
        self.info(f"{text}: done in {format_duration(time.perf_counter() - start)}")

    @contextmanager
    def progress(self, text: str, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("<"), TimeRemainingColumn())
        with self._progress(*columns, transient=True) as p:
            task = p.add_task(text, total=total)
            yield lambda done, total=total: p.update(task, completed=done, total=total)

    @contextmanager
    def training(self):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.start = time.perf_counter()
        columns = (
            TextColumn("step"), MofNCompleteColumn(), BarColumn(bar_width=24), TimeElapsedColumn(), TextColumn("<"),
            TimeRemainingColumn(), TextColumn("{task.fields[stats]}"),
        )
        with self._progress(*columns, transient=False) as bar:
            self._bar = (bar, bar.add_task("train", total=self.total, stats="generating the first batch ..."))
            try:
                yield
            finally:
                self._bar = None

    def step(self, step: int, m: dict) -> None:
        stats = step_stats(m)
        line = f"step {step:>{len(str(self.total))}}/{self.total} | " + " | ".join(stats)
        if self._bar is None:
            self.info(line)
            return
        bar, task = self._bar
        bar.console.print(line, markup=False)
        bar.update(task, completed=step, stats=" | ".join(stats[:4]))


class QuietConsole(PlainConsole):
    def __init__(self, total_steps: int, stream=None):
        super().__init__(total_steps, stream, quiet=True)


def make_console(mode: str, total_steps: int, stream=None) -> PlainConsole:
    """The console for a mode; "auto" is the live display on a terminal, plain lines otherwise."""
    if mode not in CONSOLE_MODES:
        raise ValueError(f"unknown console mode {mode!r}; valid: {', '.join(CONSOLE_MODES)}")
    if mode == "auto":
        out = stream or sys.stdout
        mode = "live" if getattr(out, "isatty", lambda: False)() else "plain"
    return {"live": LiveConsole, "plain": PlainConsole, "jsonl": JsonlConsole, "quiet": QuietConsole}[mode](total_steps, stream)
