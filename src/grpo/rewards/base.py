"""The reward-function contract, the registry, and scoring a batch.

A reward function is any Python function; the config names it (`rewards: [{name: ...}]`) as
  - a built-in: `answer_accuracy`, `math_accuracy`, `format`, `code_tests`, ... (see `grpo.rewards.builtin`),
  - a function in a file: `path/to/my_rewards.py:my_reward` (relative to the current directory),
  - a function in an importable module: `my_package.rewards:my_reward`.

Two shapes, told apart by the parameter names (no decorator, no import of grpo needed):

    def batch_reward(completions, answer, prompts=None) -> list[float | None]:   # whole batch
        ...                                      # lists of N = B*G items; called once per step
    def one_reward(completion, answer, prompt=None) -> float | None:              # one completion
        ...                                      # called N times, in parallel (see below)

- Dataset columns arrive as keyword arguments by name (`answer` above is the row's `answer`;
  for a batch reward a list of N values, for a per-completion reward the row's value); the
  config's `args` are passed as keyword arguments too. Parameters without a default are
  required columns: a prompt file without them is rejected before any model loads. A function
  with `**kwargs` receives every column; one without gets only the columns it names.
- `async def` works for both shapes. Per-completion rewards run in parallel: sync ones in a
  thread pool of `concurrency` threads (use it for I/O or for work that releases the GIL, e.g.
  a subprocess such as the code sandbox), async ones as `concurrency` concurrent tasks.
  Batch rewards run once, in the calling thread (vectorize inside them if you like).
- Return one float (bool and 1-element tensors are fine) or None per completion. None means
  "does not apply": left out of that completion's weighted sum and of the metrics, not counted
  as zero (docs/algorithm.md section 4). Any other value, or a list of the wrong length, is an error.
- Process rewards (docs/algorithm.md section 2): instead of a float, a completion's value may be a list
  of (end, reward) pairs, one per reasoning step, where `end` is a character offset into the
  completion text: the step is `completion[:end]`; its reward lands on the token holding
  character `end - 1` (grpo.rewards.process.step_token_index). Its scalar value (weighted sum,
  metrics, outcome advantages) is the mean of its step rewards, None when it has no steps.
  The trainer also passes `completion_lengths` (token counts, EOS included) and `max_new_tokens`.
- A reward that raises stops the run with its name, the prompt and the completion that failed
  (a failing batch reward is re-run one completion at a time to find it), unless its config
  says `on_error: none`: then the failing completions score None and are counted in the
  metric `reward/<name>/errors`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import importlib
import importlib.util
import inspect
import math
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch

RewardFn = Callable[..., Any]
REWARDS: dict[str, RewardFn] = {}
_SPECIAL = ("prompts", "completions", "prompt", "completion")


def register_reward(name: str):
    def deco(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is registered twice")
        REWARDS[name] = fn
        return fn

    return deco


class RewardError(RuntimeError):
    """A reward function failed or returned something that is not one number or None per completion."""


class RewardLoadError(ValueError):
    """A reward named in the config cannot be found or loaded; the message says how to fix it."""


# --- finding reward functions by name ----------------------------------------------------------

_FILE_MODULES: dict[Path, Any] = {}


def get_reward(name: str) -> RewardFn:
    """A built-in by name, `path/to/file.py:function`, or `package.module:function`."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" not in name:
        raise RewardLoadError(
            f"unknown reward {name!r}; valid: {sorted(REWARDS)}, or your own function as "
            "path/to/file.py:function or package.module:function"
        )
    target, func = name.rsplit(":", 1)
    if not func.isidentifier():
        raise RewardLoadError(f"reward {name!r}: {func!r} after the ':' is not a function name")
    module = load_module(name)
    if not hasattr(module, func):
        defined = sorted(k for k, v in vars(module).items() if inspect.isfunction(v) and not k.startswith("_"))
        raise RewardLoadError(f"reward {name!r}: {target} has no function {func!r}; functions there: {', '.join(defined) or 'none'}")
    fn = getattr(module, func)
    if not callable(fn):
        raise RewardLoadError(f"reward {name!r}: {func!r} in {target} is a {type(fn).__name__}, not a function")
    return fn


def file_target(name: str) -> str | None:
    """The file of a reward named `path/to/file.py:function` (as written); None for a built-in or a module's."""
    if name in REWARDS or ":" not in name:
        return None
    target = name.rsplit(":", 1)[0]
    return target if target.endswith(".py") or "/" in target or "\\" in target else None


def load_module(name: str, kind: str = "reward"):
    """The module that `path/to/file.py:attr` (a file, imported once) or `package.module:attr` names.
    Raises RewardLoadError naming the `kind` ("reward", "environment", "tool") and what is wrong."""
    target = name.rsplit(":", 1)[0]
    return _load_file(name, target, kind) if file_target(name) else _import(name, target, kind)


def _load_file(name: str, target: str, kind: str = "reward"):
    path = Path(target).expanduser()
    if not path.is_file():
        raise RewardLoadError(f"{kind} {name!r}: no such file {target} (relative paths start at the current directory, {Path.cwd()})")
    path = path.resolve()
    if path not in _FILE_MODULES:
        module_name = f"grpo_user_rewards_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.parent))  # so the file can import its neighbours
        try:
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(module_name, None)
            raise RewardLoadError(f"{kind} {name!r}: importing {target} failed: {type(e).__name__}: {e}{_where(e)}") from None
        finally:
            sys.path.remove(str(path.parent))
        _FILE_MODULES[path] = module
    return _FILE_MODULES[path]


def _import(name: str, target: str, kind: str = "reward"):
    try:
        return importlib.import_module(target)
    except Exception as e:
        raise RewardLoadError(f"{kind} {name!r}: cannot import module {target!r}: {type(e).__name__}: {e}") from None


def _parameters(fn: RewardFn) -> tuple[list[inspect.Parameter], bool]:
    params = list(inspect.signature(fn).parameters.values())
    return params, any(p.kind is p.VAR_KEYWORD for p in params)


def is_per_completion(fn: RewardFn) -> bool:
    """A function with a `completion` parameter (and no `completions`) scores one completion per call."""
    names = {p.name for p in _parameters(fn)[0]}
    return "completion" in names and "completions" not in names


def required_columns(fn: RewardFn, fixed_args: dict | None = None) -> list[str]:
    """Dataset columns a reward needs: its parameters without a default, beyond prompt(s)/completion(s)."""
    names = []
    for p in _parameters(fn)[0]:
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.default is not p.empty:
            continue
        if p.name not in _SPECIAL and p.name not in (fixed_args or {}):
            names.append(p.name)
    return names


def check_args(name: str, fn: RewardFn, args: dict) -> None:
    """Config `args` must be parameters of the function (unless it takes **kwargs)."""
    params, var_kw = _parameters(fn)
    names = [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    unknown = [a for a in args if a not in names or a in _SPECIAL]
    if unknown and not var_kw:
        raise RewardLoadError(f"reward {name!r} takes no argument {unknown[0]!r}; its parameters: {', '.join(names)}")


# --- a configured reward ------------------------------------------------------------------------


@dataclass
class Reward:
    """A reward function as configured: its metric name, weight, fixed args and error policy."""

    name: str  # the name in metrics, samples and error messages
    fn: RewardFn
    weight: float = 1.0
    args: dict = field(default_factory=dict)
    on_error: Literal["raise", "none"] = "raise"
    concurrency: int = 8  # per-completion rewards: threads (sync) or concurrent tasks (async)


def build_rewards(specs) -> list[Reward]:
    """Config RewardSpecs -> Rewards."""
    return [Reward(s.label or default_label(s.name), get_reward(s.name), s.weight, dict(s.args), s.on_error, s.concurrency) for s in specs]


def default_label(name: str) -> str:
    """The metric name of a reward: the built-in's name, or the function name of `file.py:fn`."""
    return name.rsplit(":", 1)[1] if ":" in name else name


Steps = list[tuple[int, float]]  # (character end offset in the completion, reward) per step


Steps = list[tuple[int, float]]  # (character end offset in the completion, reward) per step


@dataclass
class RewardResult:
    per_function: dict[str, torch.Tensor]  # name -> [N] float64, NaN where the function returned None
    total: torch.Tensor  # [N] float64 weighted sum of the non-None rewards; NaN where all were None
    # name -> N step lists (None where the function gave a scalar or None), for the functions
    # that returned step rewards for at least one completion
    steps: dict[str, list[Steps | None]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)  # name -> completions that raised (on_error: none)
    # name -> completions scored NaN or inf (a bug, unlike None); the trainer skips such a step
    nonfinite: dict[str, int] = field(default_factory=dict)


def _as_steps(v) -> Steps | None:
    """A list of (end, reward) pairs as ints and floats, or None when v is not one."""
    if not isinstance(v, (list, tuple)):
        return None
    try:
        return [(int(end), float(r)) for end, r in v]
    except (TypeError, ValueError):
        return None


# --- calling them -------------------------------------------------------------------------------


def _kwargs(fn: RewardFn, available: dict) -> dict:
    """The keyword arguments a function accepts: all with **kwargs, else only those it names."""
    params, var_kw = _parameters(fn)
    if var_kw:
        return available
    names = {p.name for p in params}
    return {k: v for k, v in available.items() if k in names}


def _run_coroutine(coro):
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # called from inside an event loop
        return pool.submit(asyncio.run, coro).result()


def _call(fn: RewardFn, kwargs: dict):
    out = fn(**_kwargs(fn, kwargs))
    return _run_coroutine(out) if inspect.isawaitable(out) else out


def _row_kwargs(i: int, prompts, completions, columns: dict, args: dict) -> dict:
    return {"prompt": prompts[i], "completion": completions[i], **{k: v[i] for k, v in columns.items()}, **args}


def _batch_kwargs(idx: Sequence[int], prompts, completions, columns: dict, args: dict) -> dict:
    pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
    return {"prompts": pick(prompts), "completions": pick(completions), **{k: pick(v) for k, v in columns.items()}, **args}


def _per_completion(reward: Reward, prompts, completions, columns) -> tuple[list, dict[int, BaseException]]:
    """One call per completion, in parallel. Returns (values, {index: exception})."""
    n, fn = len(completions), reward.fn
    values: list = [None] * n
    failures: dict[int, BaseException] = {}
    if inspect.iscoroutinefunction(fn):
        async def gather():
            gate = asyncio.Semaphore(reward.concurrency)

            async def one(i):
                async with gate:
                    return await fn(**_kwargs(fn, _row_kwargs(i, prompts, completions, columns, reward.args)))

            return await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)

        results = _run_coroutine(gather())
    else:
        def one(i):
            try:
                return _call(fn, _row_kwargs(i, prompts, completions, columns, reward.args))
            except Exception as e:  # returned, so that every completion gets its turn
                return _Failed(e)

        if reward.concurrency <= 1 or n == 1:
            results = [one(i) for i in range(n)]
        else:
            with concurrent.futures.ThreadPoolExecutor(min(reward.concurrency, n), thread_name_prefix="reward") as pool:
                results = list(pool.map(one, range(n)))
    for i, r in enumerate(results):
        if isinstance(r, _Failed):
            failures[i] = r.error
        elif isinstance(r, BaseException):
            if not isinstance(r, Exception):
                raise r  # KeyboardInterrupt, SystemExit
            failures[i] = r
        else:
            values[i] = r
    return values, failures


@dataclass
class _Failed:
    error: Exception


def _batch(reward: Reward, prompts, completions, columns) -> tuple[list, dict[int, BaseException]]:
    """One call on the whole batch; if it raises, once per completion to find the ones that fail."""
    n = len(completions)
    try:
        values = _call(reward.fn, _batch_kwargs(range(n), prompts, completions, columns, reward.args))
        _check_length(reward.name, values, n)
        return list(values), {}
    except RewardError:
        raise
    except Exception as batch_error:
        values, failures = [None] * n, {}
        for i in range(n):
            try:
                one = _call(reward.fn, _batch_kwargs([i], prompts, completions, columns, reward.args))
                _check_length(reward.name, one, 1)
                values[i] = one[0]
            except RewardError:
                raise
            except Exception as e:
                failures[i] = e
        if not failures:  # fails on the batch only: blame the batch
            failures = {i: batch_error for i in range(n)}
        return values, failures


def _check_length(name: str, values, n: int) -> None:
    if not isinstance(values, Sequence) or isinstance(values, str) or len(values) != n:
        got = len(values) if isinstance(values, Sequence) else type(values).__name__
        raise RewardError(f"reward {name!r} must return a list of {n} values (one per completion), got {got}")


def _check_values(name: str, values, n: int, prompts, completions) -> tuple[list[float], list[Steps | None]]:
    """Scalar value per completion (NaN for None, step mean for step lists) and the step lists."""
    _check_length(name, values, n)
    out: list[float] = []
    steps: list[Steps | None] = []
    for i, v in enumerate(values):
        step_list = _as_steps(v)
        steps.append(step_list)
        if v is None:
            out.append(math.nan)
        elif isinstance(v, (bool, int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1):
            out.append(float(v))
        elif step_list is not None:
            out.append(sum(r for _, r in step_list) / len(step_list) if step_list else math.nan)
        else:
            raise RewardError(
                f"reward {name!r} returned {v!r} ({type(v).__name__}) for completion {i}; expected a number, None "
                f"or a list of (end offset, reward) steps\n  prompt: {_short(prompts[i])}\n  completion: {_short(completions[i])}"
            )
    return out, steps


def _finite(v, step_list: Steps | None) -> bool:
    """False for a NaN or infinite number (None, "does not apply", is fine)."""
    if step_list is not None:
        return all(math.isfinite(r) for _, r in step_list)
    return v is None or math.isfinite(float(v))


def _short(text, limit: int = 600) -> str:
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 20] + f"... ({len(r)} chars)"


def _where(e: BaseException) -> str:
    """' (at file.py:12 in fn)': the innermost frame of the traceback."""
    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {Path(f.filename).name}:{f.lineno} in {f.name})"


def _raise_failure(reward: Reward, i: int, e: BaseException, count: int, n: int, prompts, completions):
    raise RewardError(
        f"reward {reward.name!r} raised {type(e).__name__}: {e}{_where(e)}\n"
        f"  on completion {i} of {n} ({count} failed)\n"
        f"  prompt: {_short(prompts[i])}\n  completion: {_short(completions[i])}\n"
        f"  (to score such completions as None instead, set on_error: none for this reward)"
    ) from e


def reward_columns(
    rows: list[dict],  # B dataset rows
    group_size: int,  # G completions per row
    prompt_column: str,
    lengths: Sequence[int] | None = None,  # N completion lengths in tokens, EOS included
    max_new_tokens: int | None = None,
) -> dict[str, list]:
    """What reward functions get besides prompts and completions, one value per completion (row n = b * G + g):
    every dataset column but the prompt, by name (a row without a column gives None); and, when given,
    `completion_lengths` and `max_new_tokens`, which length rewards such as overlong_penalty read."""
    names = dict.fromkeys(k for r in rows for k in r if k != prompt_column)
    columns = {k: [r.get(k) for r in rows for _ in range(group_size)] for k in names}
    if lengths is not None:
        columns["completion_lengths"] = list(lengths)
        columns["max_new_tokens"] = [max_new_tokens] * len(columns["completion_lengths"])
    return columns


def score(
    rewards: list[Reward | tuple],  # Reward, or (name, function, weight, fixed kwargs)
    prompts: list[str],
    completions: list[str],
    columns: dict[str, list],
) -> RewardResult:
    """Run every reward function on the batch and combine them with their weights."""
    n = len(completions)
    per_function: dict[str, torch.Tensor] = {}
    steps: dict[str, list[Steps | None]] = {}
    errors: dict[str, int] = {}
    nonfinite: dict[str, int] = {}
    total = torch.zeros(n, dtype=torch.float64)
    any_applies = torch.zeros(n, dtype=torch.bool)
    for reward in rewards:
        if not isinstance(reward, Reward):
            reward = Reward(*reward)
        run = _per_completion if is_per_completion(reward.fn) else _batch
        values, failures = run(reward, prompts, completions, columns)
        if failures and reward.on_error == "raise":
            i = min(failures)
            _raise_failure(reward, i, failures[i], len(failures), n, prompts, completions)
        if reward.on_error == "none":
            errors[reward.name] = len(failures)
        scalars, step_lists = _check_values(reward.name, values, n, prompts, completions)
        bad = sum(1 for v, st in zip(values, step_lists) if not _finite(v, st))
        if bad:
            nonfinite[reward.name] = bad
        if any(x is not None for x in step_lists):
            steps[reward.name] = step_lists
        r = torch.tensor(scalars, dtype=torch.float64)
        per_function[reward.name] = r
        applies = ~torch.isnan(r)
        total = total + torch.where(applies, reward.weight * r, torch.zeros_like(r))
        any_applies |= applies
    total = torch.where(any_applies, total, torch.full_like(total, math.nan))
    return RewardResult(per_function=per_function, total=total, errors=errors, steps=steps, nonfinite=nonfinite)
