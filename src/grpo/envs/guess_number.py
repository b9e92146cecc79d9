"""The `guess_number` built-in: a game whose answer needs feedback over several turns.

The environment thinks of a whole number in [low, high]; each model turn guesses one (the last number
in its text) and the environment answers, as the user, that the number is higher or lower, until the
guess is right: reward 1.0 on the winning turn (the episode ends), 0.0 on every other turn.

Why 1..16 by default: bisection finds any of 16 numbers in ceil(log2(17)) = 5 guesses, so with
`environment.max_turns: 5` a perfect player always wins while a player that ignores the feedback wins
about 5/16 of the time (5 distinct guesses), and a model that follows "higher"/"lower" even loosely
does clearly better: a signal the 135M default model can climb within a short run, in episodes of
a few short turns. A wider range needs max_turns >= ceil(log2(high - low + 2)).

It needs no data: `guess_number_rows(n, seed)` makes the rows (a prompt, and the `secret` that every
episode of a row plays, so the G episodes of a group face the same game).
"""

from __future__ import annotations

import random

from grpo.data.guess_number import RULES, guess_number_rows  # noqa: F401  (the rows: data/, a task)
from grpo.envs.base import Environment, Step, register_environment
from grpo.rewards.builtin import extract_answer, to_number

def read_guess(text: str) -> int | None:
    """The guess in a model turn: its last number (or its <answer>/\\boxed{}), when it is a whole number."""
    value = to_number(extract_answer(text))
    return int(value) if value is not None and value.is_integer() else None


@register_environment("guess_number")
class GuessNumberEnvironment(Environment):
    """Guess a secret whole number in [low, high] with "higher"/"lower" hints.

    Args:
        low, high: the range of the secret (both included).
        secret_column: the row column holding the secret (guess_number_rows writes it); a row without it
            gets a secret drawn from random.Random(seed), i.e. one per episode.
        demonstrate: put one worked game before the rules, as chat turns: the rules, then bisection's
            guesses for `demo_secret`, each a bare number, with this environment's own hints, until it wins.
            A small model that answers the rules with a sentence sees what a turn looks like
            (configs/guess_number.yaml).
        demo_secret: the demonstrated game's secret (in [low, high]); default two thirds up the range (11 of
            1..16: guesses 8, 12, 10, 11, with both hints).
        say_range: each hint also says where the secret can still be, from every hint so far ("My number is
            higher than 8: it is from 9 to 16."): the game then needs only picking a number in the range said
            last, not reasoning over the earlier hints.
    """

    def __init__(self, low: int = 1, high: int = 16, secret_column: str = "secret", demonstrate: bool = False,
                 demo_secret: int | None = None, say_range: bool = False):
        if low > high:
            raise ValueError(f"guess_number: low ({low}) must be <= high ({high})")
        if demo_secret is not None and not low <= demo_secret <= high:
            raise ValueError(f"guess_number: demo_secret ({demo_secret}) is outside [{low}, {high}]")
        self.low, self.high, self.secret_column = low, high, secret_column
        self.demonstrate, self.say_range = demonstrate, say_range
        self.demo_secret = low + (high - low) * 2 // 3 if demo_secret is None else demo_secret
        self.secret: int | None = None
        self.left = (low, high)  # where the secret can be, after the hints so far

    def reset(self, row: dict, seed: int) -> list[dict]:
        """Pick the secret (the row's, else a seeded draw) and tell the rules (the row's prompt is not used:
        the rules follow this environment's low and high)."""
        secret = row.get(self.secret_column)
        self.secret = random.Random(seed).randint(self.low, self.high) if secret is None else int(secret)
        if not self.low <= self.secret <= self.high:
            raise ValueError(f"guess_number: the row's {self.secret_column} {self.secret} is outside [{self.low}, {self.high}]")
        self.left = (self.low, self.high)
        messages = self.prompt_messages({self.prompt_column: RULES.format(low=self.low, high=self.high)})
        if self.demonstrate:
            system = 1 if messages[0]["role"] == "system" else 0
            messages[-1]["content"] = f"Right, it was {self.demo_secret}. New game. " + messages[-1]["content"]
            messages[system:system] = self.demo_turns()
        return messages

    def step(self, text: str) -> Step:
        """Compare the turn's guess with the secret: 1.0 and done when right, else a hint and 0.0."""
        guess = read_guess(text)
        if guess == self.secret:
            return Step(messages=[], reward=1.0, done=True)
        hint, self.left = self.hint(guess, self.secret, self.left)
        return Step(messages=[{"role": "user", "content": hint}], reward=0.0)

    def hint(self, guess: int | None, secret: int, left: tuple[int, int]) -> tuple[str, tuple[int, int]]:
        """The answer to a wrong guess (or to a turn without one), and where the secret can be after it
        (`left` before it)."""
        if guess is None:
            return f"Your reply has no whole number. Reply with one number from {self.low} to {self.high}.", left
        if not self.low <= guess <= self.high:
            return f"{guess} is not from {self.low} to {self.high}. Guess again.", left
        lo, hi = left
        lo, hi = (max(lo, guess + 1), hi) if secret > guess else (lo, min(hi, guess - 1))
        where = f": it is from {lo} to {hi}." if self.say_range and lo < hi else \
            f": it is {lo}." if self.say_range else "."
        return f"My number is {'higher' if secret > guess else 'lower'} than {guess}{where} Guess again.", (lo, hi)

    def demo_turns(self) -> list[dict]:
        """A won game as chat messages: the rules, then bisection's guesses for demo_secret with their hints;
        the last message is the winning guess (reset then says so before the real game's rules)."""
        messages = [{"role": "user", "content": RULES.format(low=self.low, high=self.high)}]
        left = (self.low, self.high)
        while True:
            guess = (left[0] + left[1]) // 2
            messages.append({"role": "assistant", "content": str(guess)})
            if guess == self.demo_secret:
                break
            hint, left = self.hint(guess, self.demo_secret, left)
            messages.append({"role": "user", "content": hint})
        return messages
