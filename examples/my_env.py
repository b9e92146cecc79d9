"""An environment of your own: the model writes a word backwards and, when it is wrong, is told which letters are
and may try again. Used by examples/agent.yaml (`environment.name: examples/my_env.py:Backwards`)."""

import grpo


class Backwards(grpo.Environment):
    """Write the row's `word` backwards in at most `tries` turns. Reward 1 at the turn that gets it right (0 for each
    wrong turn); after a wrong try the environment shows which letters were right, as a user message."""

    def __init__(self, tries: int = 3):
        self.tries = tries

    def reset(self, row: dict, seed: int) -> list[dict]:
        # grpo makes a fresh instance per episode and calls reset first; `seed` is the group's (unused: no randomness)
        self.target, self.turn = row["word"][::-1], 0
        return [{"role": "user", "content": f"Write the word {row['word']} backwards, letters only."}]

    def step(self, text: str) -> grpo.Step:
        self.turn += 1
        words = text.strip().split()
        guess = words[-1].strip(".,!\"'").lower() if words else ""
        if guess == self.target:
            return grpo.Step(reward=1.0, done=True)
        marks = "".join(c if i < len(guess) and guess[i] == c else "_" for i, c in enumerate(self.target))
        hint = f"Not yet: {marks} ({len(self.target)} letters). Try again."
        return grpo.Step(messages=[{"role": "user", "content": hint}], reward=0.0, done=self.turn >= self.tries)
