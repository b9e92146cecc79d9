"""The environment contract, the registry of built-ins, and finding an environment by name.

An environment plays one episode with the model: `reset` gives the first messages, then each model
turn (its decoded text) goes to `step`, which answers with messages, a reward and whether the
episode is over. The config names the class like a reward (`environment.name`):
  - a built-in: `calculator`, `guess_number`, `python` (see grpo.envs.calculator, ...),
  - a class in a file: `path/to/my_env.py:MyEnv` (relative to the current directory),
  - a class in an importable module: `my_package.envs:MyEnv`;
and grpo makes a fresh instance per episode, `cls(**environment.args)`, so per-episode state lives
on the instance.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from grpo.data import chat_messages
from grpo.rewards.base import RewardLoadError, load_module


@dataclass
class Step:
    """The environment's answer to one model turn."""

    messages: list[dict] = field(default_factory=list)
    """Chat messages appended after the model's turn ({"role": "tool" | "user", "content": str, ...})."""
    reward: float | None = None
    """This turn's reward (None: none); it lands on the turn's last model token."""
    done: bool = False
    """The episode ends after this turn."""
    tool_calls: int = 0
    """Tool calls made in this turn (metrics)."""
    tool_errors: int = 0
    """Of which failed: malformed, unknown tool, wrong arguments, raised, timed out (metrics)."""


class Environment:
    """One episode; grpo makes a fresh instance per episode: cls(**environment.args).

    Subclass it and write `step` (and `reset` when the first messages are not just the row's prompt).
    grpo calls, in this order: the constructor, `bind(tokenizer)`, `reset(row, seed)`, then `step(text)`
    once per model turn until a Step says `done` or a limit of the config ends the episode
    (environment.max_turns, environment.max_tokens, sampling.max_new_tokens per turn).
    An exception out of reset or step is handled per environment.on_error.
    """

    prompt_column: str = "prompt"
    """The dataset column holding the prompt; set by grpo on every instance before reset (data.prompt_column)."""
    system_prompt: str | None = None
    """Set by grpo before reset (data.system_prompt)."""
    stop: tuple[str, ...] = ()
    """Extra stop strings for the model's turns (e.g. "</calculator>"); read after `bind`, before the first turn."""

    def bind(self, tokenizer) -> None:
        """Optional hook: called once after construction, before `reset`, with the run's tokenizer (e.g. to
        choose a tool-call format from its chat template and set `stop`). Default: nothing."""

    def reset(self, row: dict, seed: int) -> list[dict]:
        """The episode's first messages (chat messages, rendered by the chat template).

        `row` is the dataset row (every column); `seed` is this episode's seed (derived from the group
        seed and the sample index: use `random.Random(seed)` for anything random, so runs reproduce
        and resume). Default: the row's prompt as chat messages (`self.prompt_messages(row)`)."""
        return self.prompt_messages(row)

    def step(self, text: str) -> Step:
        """The model's turn (its decoded text, special tokens skipped) -> the environment's answer."""
        raise NotImplementedError(f"{type(self).__name__} must define step(self, text) -> grpo.envs.Step")

    def template_tools(self, tokenizer) -> list[dict] | None:
        """JSON schemas to render through the chat template's `tools=` (None: the template gets no tools)."""
        return None

    def prompt_messages(self, row: dict) -> list[dict]:
        """The row's prompt column as chat messages (a copy), with `system_prompt` first when set and
        the prompt is a string (a list of messages is taken as it is)."""
        return [dict(m) for m in chat_messages(row[self.prompt_column], self.system_prompt)]


# --- the registry and finding environments by name -------------------------------------------------

ENVIRONMENTS: dict[str, type[Environment]] = {}


class EnvironmentLoadError(ValueError):
    """An environment or tool named in the config cannot be found or loaded; the message says how to fix it."""


def register_environment(name: str):
    """Class decorator: make an Environment subclass a built-in, named `name` in configs."""

    def deco(cls: type[Environment]) -> type[Environment]:
        if name in ENVIRONMENTS:
            raise ValueError(f"environment {name!r} is registered twice")
        if not (isinstance(cls, type) and issubclass(cls, Environment)):
            raise TypeError(f"environment {name!r}: {cls!r} is not a subclass of grpo.envs.Environment")
        ENVIRONMENTS[name] = cls
        return cls

    return deco


def load_attribute(name: str, kind: str):
    """The object that `path/to/file.py:attr` or `package.module:attr` names (`kind`, e.g. "tool",
    only words the errors). Raises EnvironmentLoadError saying what is wrong."""
    if ":" not in name:
        raise EnvironmentLoadError(f"{kind} {name!r}: write it as path/to/file.py:name or package.module:name")
    target, attr = name.rsplit(":", 1)
    if not attr.isidentifier():
        raise EnvironmentLoadError(f"{kind} {name!r}: {attr!r} after the ':' is not a Python name")
    try:
        module = load_module(name, kind)
    except RewardLoadError as e:
        raise EnvironmentLoadError(str(e)) from None
    if not hasattr(module, attr):
        public = sorted(k for k in vars(module) if not k.startswith("_") and k != "annotations")
        raise EnvironmentLoadError(f"{kind} {name!r}: {target} has no {attr!r}; names there: {', '.join(public) or 'none'}")
    return getattr(module, attr)


def load_environment(name: str) -> type[Environment]:
    """The Environment subclass a config names: a built-in, `path/to/file.py:Class` or `package.module:Class`."""
    if name in ENVIRONMENTS:
        return ENVIRONMENTS[name]
    if ":" not in name:
        raise EnvironmentLoadError(
            f"unknown environment {name!r}; built-ins: {', '.join(sorted(ENVIRONMENTS))}, or your own class as "
            "path/to/file.py:Class or package.module:Class"
        )
    cls = load_attribute(name, "environment")
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        what = f"the class {cls.__name__}" if isinstance(cls, type) else f"a {type(cls).__name__}"
        raise EnvironmentLoadError(
            f"environment {name!r} is {what}, not a subclass of grpo.envs.Environment "
            "(write: class MyEnv(grpo.envs.Environment): ... with reset and step)"
        )
    return cls


def check_environment_args(cls: type[Environment], args: dict) -> None:
    """Refuse config `args` that the class's constructor does not take (unless it takes **kwargs)."""
    params = list(inspect.signature(cls).parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [a for a in args if a not in accepted]
    if unknown:
        raise EnvironmentLoadError(
            f"environment {cls.__name__} takes no argument {', '.join(map(repr, unknown))} "
            f"(environment.args); it takes: {', '.join(accepted) or 'none'}"
        )
