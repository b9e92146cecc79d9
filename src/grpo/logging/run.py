"""The run folder's files (metrics.jsonl, samples.jsonl, JSON results) and the console line."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN; a missing value reads as null
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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


class ConsoleLine:
    """One readable line per step: progress, reward, accuracy, KL, length, speed, time left."""

    def __init__(self, total_steps: int, stream=None, quiet: bool = False):
        self.total, self._stream, self.quiet = total_steps, stream, quiet
        self.start = time.perf_counter()

    @property
    def stream(self):
        return self._stream or sys.stdout  # looked up late, so redirected stdout is honoured

    def step(self, step: int, m: dict) -> None:
        if self.quiet:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / step * (self.total - step)
        parts = [
            f"step {step:>{len(str(self.total))}}/{self.total}",
            f"reward {m['reward/mean']:.3f}±{m['reward/std']:.2f}",
        ]
        if "reward/answer_accuracy/mean" in m:
            parts.append(f"acc {m['reward/answer_accuracy/mean']:.2f}")
        parts += [
            f"kl {m['kl/mean']:.4f}" if "kl/mean" in m else None,
            f"len {m['completion/length_mean']:.1f}",
            f"{m['time/step']:.1f}s (gen {m['time/generate']:.1f} train {m['time/train']:.1f})",
            f"{m['throughput/tokens_per_s']:.0f} tok/s",
            f"{format_duration(elapsed)}<{format_duration(eta)}",
        ]
        print(" | ".join(p for p in parts if p), file=self.stream, flush=True)

    def info(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.stream, flush=True)
