"""Environments: the contract and loading (grpo.envs.base) and the built-ins played as whole episodes
with scripted model turns (no model). The tool machinery's parsing and running: tests/test_tools.py."""

import random
import re

import pytest

from grpo.envs import (
    ENVIRONMENTS,
    Environment,
    EnvironmentLoadError,
    Step,
    check_environment_args,
    guess_number_rows,
    load_environment,
    register_environment,
)
from grpo.envs.calculator import CalculatorEnvironment, calculator, format_number
from grpo.envs.guess_number import RULES, GuessNumberEnvironment, read_guess
from grpo.envs.python_tool import PythonEnvironment, truncate
from grpo.testing import tiny_tokenizer


def play(env, row, texts, seed=0, tokenizer=None):
    """Bind, reset and step through scripted model turns until done; (first messages, steps)."""
    env.bind(tokenizer or tiny_tokenizer())
    first = env.reset(row, seed)
    steps = []
    for text in texts:
        steps.append(env.step(text))
        if steps[-1].done:
            break
    return first, steps


# --- the contract ------------------------------------------------------------------------------------


class Echo(Environment):
    def step(self, text):
        return Step(messages=[{"role": "user", "content": text.upper()}], reward=1.0, done=text == "bye")


def test_step_defaults():
    assert Step() == Step(messages=[], reward=None, done=False, tool_calls=0, tool_errors=0)


def test_default_reset_is_the_prompt_with_the_system_prompt():
    env = Echo()
    env.system_prompt = "Be brief."
    assert env.reset({"prompt": "hi", "x": 1}, 0) == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    env.prompt_column = "question"
    env.system_prompt = None
    assert env.reset({"question": "q?"}, 0) == [{"role": "user", "content": "q?"}]


def test_default_reset_copies_a_message_list_prompt():
    row = {"prompt": [{"role": "user", "content": "hi"}]}
    messages = Echo().reset(row, 0)
    messages[0]["content"] = "changed"
    messages.append({"role": "user", "content": "more"})
    assert row == {"prompt": [{"role": "user", "content": "hi"}]}


def test_defaults_of_the_optional_hooks():
    env = Echo()
    assert env.bind(tiny_tokenizer()) is None and env.stop == () and env.template_tools(tiny_tokenizer()) is None
    with pytest.raises(NotImplementedError, match="must define step"):
        Environment().step("x")


def test_register_refuses_duplicates_and_non_environments():
    with pytest.raises(ValueError, match="registered twice"):
        register_environment("calculator")(Echo)
    with pytest.raises(TypeError, match="not a subclass"):
        register_environment("not_an_env_test")(dict)
    assert "not_an_env_test" not in ENVIRONMENTS


def test_builtins_are_registered():
    assert load_environment("calculator") is CalculatorEnvironment
    assert load_environment("guess_number") is GuessNumberEnvironment
    assert load_environment("python") is PythonEnvironment


ENV_FILE = """
import grpo.envs

class Guess(grpo.envs.Environment):
    def step(self, text):
        return grpo.envs.Step(reward=1.0, done=True)

class NotAnEnv:
    pass

def a_function():
    pass
"""


@pytest.fixture
def env_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "envs_dir").mkdir()
    (tmp_path / "envs_dir" / "my_env.py").write_text(ENV_FILE)
    return "envs_dir/my_env.py"


def test_load_a_class_from_a_file_and_from_a_module(env_file):
    cls = load_environment(f"{env_file}:Guess")
    assert issubclass(cls, Environment) and cls.__name__ == "Guess"
    assert load_environment(f"{env_file}:Guess") is cls  # the file is imported once
    assert load_environment("grpo.envs.calculator:CalculatorEnvironment") is CalculatorEnvironment


@pytest.mark.parametrize(
    "name, message",
    [
        ("nope", "unknown environment 'nope'; built-ins: calculator, guess_number, python"),
        ("missing.py:Guess", "environment 'missing.py:Guess': no such file missing.py"),
        ("envs_dir/my_env.py:Gess", "has no 'Gess'; names there: Guess, NotAnEnv, a_function, grpo"),
        ("envs_dir/my_env.py:NotAnEnv", "is the class NotAnEnv, not a subclass of grpo.envs.Environment"),
        ("envs_dir/my_env.py:a_function", "is a function, not a subclass of grpo.envs.Environment"),
        ("envs_dir/my_env.py:1x", "'1x' after the ':' is not a Python name"),
        ("no_such_package_xyz.envs:Env", "environment 'no_such_package_xyz.envs:Env': cannot import module"),
    ],
)
def test_load_errors_say_what_is_wrong(env_file, name, message):
    with pytest.raises(EnvironmentLoadError) as info:
        load_environment(name)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_a_file_that_fails_to_import_names_the_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken_env.py").write_text("x = 1\ny = undefined_name\n")
    with pytest.raises(EnvironmentLoadError, match=r"environment 'broken_env.py:E': importing broken_env.py failed: "
                       r"NameError: .*undefined_name.* \(at broken_env.py:2"):
        load_environment("broken_env.py:E")


def test_check_environment_args():
    check_environment_args(CalculatorEnvironment, {"format": "tags", "timeout": 1.0})
    check_environment_args(Echo, {})
    with pytest.raises(EnvironmentLoadError) as info:
        check_environment_args(GuessNumberEnvironment, {"low": 1, "hihg": 9, "lo": 0})
    assert str(info.value) == ("environment GuessNumberEnvironment takes no argument 'hihg', 'lo' (environment.args); "
                               "it takes: low, high, secret_column, demonstrate, demo_secret, say_range")

    class Open(Environment):
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    check_environment_args(Open, {"anything": 1})


# --- calculator --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expression, result",
    [("123 * 456", "56088"), ("2 ** 10", "1024"), ("7 / 2", "3.5"), ("1 / 3", "0.333333333333"), ("(1 + 2) * -3", "-9"),
     ("1,234 + 1", "1235"), ("12 × 3", "36"), ("2^3", "8"), ("8 / 4", "2"), (" 10 - 0.5 ", "9.5")],
)
def test_calculator_tool(expression, result):
    assert calculator(expression) == result


@pytest.mark.parametrize(
    "expression, error",
    [("__import__('os')", "not an arithmetic expression"), ("1 +", r"not an arithmetic expression: '1 \+'"),
     ("1 / 0", "division by zero"), ("2 ** 100", "exponent too large"), ("((9**64)**64)**64", "result too large"),
     ("1" * 201, "too long")],
)
def test_calculator_tool_refuses(expression, error):
    with pytest.raises((ValueError, ZeroDivisionError), match=error):
        calculator(expression)


def test_to_number_of_a_huge_power_is_none():
    """The shared evaluator bounds a power's size: before, ((9**64)**64)**64 raised OverflowError out of
    to_number (a crash of answer_accuracy on such an <answer>) and one more **64 ran for minutes."""
    from grpo.rewards.builtin import to_number

    assert to_number("((9**64)**64)**64") is None
    assert to_number("(((9**64)**64)**64)**64") is None
    assert to_number("2 ** 64") == 18446744073709551616.0


def test_format_number():
    assert [format_number(v) for v in (3, 3.0, -2.5, 1e20, 10**20, 0.1 + 0.2)] == [
        "3", "3", "-2.5", "1e+20", "100000000000000000000", "0.3"]


def test_calculator_episode_tags():
    env = CalculatorEnvironment()  # auto: the tiny tokenizer's template has no tools -> tags
    row = {"prompt": "What is 123 * 456?", "answer": "56088"}
    first, steps = play(env, row, ["<calculator>123 * 456</calculator>", "<calculator>123 / 0</calculator>",
                                   "It is 56,088.", "never reached"])
    assert env.stop == ("</calculator>",)
    assert first[0]["role"] == "system" and "<calculator>123 * 456</calculator>" in first[0]["content"]
    assert first[1] == {"role": "user", "content": "What is 123 * 456?"}
    assert steps == [
        Step([{"role": "tool", "content": "56088"}], None, False, 1, 0),
        Step([{"role": "tool", "content": "Error: calculator raised ZeroDivisionError: division by zero"}], None, False, 1, 1),
        Step([], 1.0, True, 0, 0),
    ]


def test_calculator_episode_wrong_and_without_an_answer():
    _, steps = play(CalculatorEnvironment(format="tags"), {"prompt": "2*3?", "answer": "6"}, ["It is 7."])
    assert steps == [Step([], 0.0, True, 0, 0)]
    _, steps = play(CalculatorEnvironment(format="tags"), {"prompt": "2*3?"}, ["It is 6."])
    assert steps == [Step([], None, True, 0, 0)]


TOOLS_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\nTools:' }}{% for t in tools %}{{ ' ' + t['function']['name'] }}{% endfor %}"
    "{{ '<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_calculator_episode_template():
    tok = tiny_tokenizer()
    tok.chat_template = TOOLS_TEMPLATE
    env = CalculatorEnvironment()
    row = {"prompt": "What is 12 * 34?", "answer": 408}
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "12 * 34"}}</tool_call>'
    first, steps = play(env, row, [call, "408"], tokenizer=tok)
    assert env.stop == ("</tool_call>",)
    assert first == [{"role": "user", "content": "What is 12 * 34?"}]  # the tools go through the template
    text = tok.apply_chat_template(first, tools=env.template_tools(tok), tokenize=False)
    assert text.startswith("<|im_start|>system\nTools: calculator<|im_end|>")
    assert steps == [Step([{"role": "tool", "content": "408", "name": "calculator"}], None, False, 1, 0), Step([], 1.0, True)]


# --- guess_number ------------------------------------------------------------------------------------


def test_guess_number_rows_are_seeded_and_in_range():
    rows = guess_number_rows(50, seed=3)
    assert rows == guess_number_rows(50, seed=3) and rows != guess_number_rows(50, seed=4)
    assert all(r["prompt"] == RULES.format(low=1, high=16) for r in rows)
    assert {r["secret"] for r in rows} <= set(range(1, 17)) and len({r["secret"] for r in rows}) > 8
    assert {r["secret"] for r in guess_number_rows(20, 0, low=5, high=6)} == {5, 6}


def test_read_guess():
    assert [read_guess(t) for t in ["8", "I guess 12.", "between 3 and 9", "no idea", "2.5", "<answer>7</answer> or 9"]] == [
        8, 12, 9, None, None, 7]


def test_guess_number_episode():
    env = GuessNumberEnvironment()
    first, steps = play(env, {"prompt": "ignored", "secret": 11}, ["8", "Maybe 12?", "no idea", "20", "10", "11", "x"])
    assert first == [{"role": "user", "content": RULES.format(low=1, high=16)}]
    hints = [s.messages[0]["content"] for s in steps[:-1]]
    assert hints == [
        "My number is higher than 8. Guess again.",
        "My number is lower than 12. Guess again.",
        "Your reply has no whole number. Reply with one number from 1 to 16.",
        "20 is not from 1 to 16. Guess again.",
        "My number is higher than 10. Guess again.",
    ]
    assert all(s.messages[0]["role"] == "user" for s in steps[:-1])
    assert [(s.reward, s.done) for s in steps] == [(0.0, False)] * 5 + [(1.0, True)]


def test_guess_number_secret_from_the_seed_without_a_secret_column():
    env = GuessNumberEnvironment(low=1, high=1000)
    env.reset({"prompt": "p"}, seed=7)
    assert env.secret == random.Random(7).randint(1, 1000)
    other = GuessNumberEnvironment(low=1, high=1000)
    other.reset({"prompt": "p"}, seed=8)
    assert other.secret == random.Random(8).randint(1, 1000) != env.secret


def test_guess_number_refuses_a_bad_range_or_secret():
    with pytest.raises(ValueError, match=r"low \(5\) must be <= high \(4\)"):
        GuessNumberEnvironment(low=5, high=4)
    with pytest.raises(ValueError, match=r"secret 17 is outside \[1, 16\]"):
        GuessNumberEnvironment().reset({"secret": 17}, 0)


def test_bisection_wins_every_default_game_in_five_turns():
    """The documented default: 1..16 is solvable in max_turns 5 by following the hints."""
    for secret in range(1, 17):
        env = GuessNumberEnvironment()
        env.reset({"secret": secret}, 0)
        low, high, turns = 1, 16, 0
        while True:
            turns += 1
            guess = (low + high) // 2
            step = env.step(f"My guess: {guess}")
            if step.done:
                break
            low, high = (guess + 1, high) if "higher" in step.messages[0]["content"] else (low, guess - 1)
        assert step.reward == 1.0 and turns <= 5, secret


@pytest.mark.parametrize("low,high,demo_secret", [(1, 16, None), (1, 16, 1), (1, 16, 16), (5, 5, None), (1, 100, 67)])
@pytest.mark.parametrize("say_range", [False, True])
def test_guess_number_demonstration_is_a_game_the_environment_itself_would_play(low, high, demo_secret, say_range):
    """Every demonstrated hint is what step() answers to that guess for demo_secret, the guesses bisect,
    the game ends on the secret, and the real game's rules come last, after the system prompt's place."""
    env = GuessNumberEnvironment(low=low, high=high, demonstrate=True, demo_secret=demo_secret, say_range=say_range)
    env.system_prompt = "Be brief."
    first = env.reset({"secret": low}, 0)
    assert first[0] == {"role": "system", "content": "Be brief."}
    demo, real = first[1:-1], first[-1]
    secret = env.demo_secret
    assert real["role"] == "user" and real["content"].endswith(RULES.format(low=low, high=high))
    assert f"it was {secret}" in real["content"]
    assert demo[0] == {"role": "user", "content": RULES.format(low=low, high=high)}
    replay = GuessNumberEnvironment(low=low, high=high, say_range=say_range)
    replay.reset({"secret": secret}, 0)
    guesses = [int(m["content"]) for m in demo[1::2]]
    assert [m["role"] for m in demo[1:]] == ["assistant", "user"] * (len(guesses) - 1) + ["assistant"]
    assert guesses[-1] == secret and len(guesses) == len(set(guesses)) <= max(1, (high - low + 2).bit_length())
    for guess, answer in zip(guesses[:-1], demo[2::2]):
        step = replay.step(str(guess))
        assert not step.done and step.messages == [answer]
    assert replay.step(str(guesses[-1])).done
    assert env.step(str(low)).done  # the demonstration does not touch the real game


@pytest.mark.parametrize("seed", range(20))
def test_guess_number_says_the_range_every_hint_so_far_leaves(seed):
    """With say_range, each hint's range is exactly the numbers that every hint so far allows (by brute force
    over the candidates), whatever the guesses: repeated, contradicting, outside the range or no number."""
    rng = random.Random(seed)
    low, high = rng.choice([(1, 16), (1, 100), (5, 9), (3, 3)])
    env = GuessNumberEnvironment(low=low, high=high, say_range=True)
    secret = rng.randint(low, high)
    env.reset({"secret": secret}, 0)
    candidates = set(range(low, high + 1))
    for _ in range(12):
        guess = rng.choice([rng.randint(low, high), rng.randint(low - 3, high + 3), None])
        step = env.step("no idea" if guess is None else f"maybe {guess}")
        if guess == secret:
            assert step.done and step.reward == 1.0
            break
        text = step.messages[0]["content"]
        if guess is not None and low <= guess <= high:
            candidates = {c for c in candidates if (c > guess) == (secret > guess) and c != guess}
            said = re.search(r"it is (?:from (\d+) to (\d+)|(\d+))\.", text).groups()
            lo, hi = (int(said[0]), int(said[1])) if said[2] is None else (int(said[2]), int(said[2]))
            assert set(range(lo, hi + 1)) == candidates, (text, guess, secret)
        else:
            assert "it is" not in text


def test_guess_number_refuses_a_demo_secret_outside_the_range():
    with pytest.raises(ValueError, match=r"demo_secret \(17\) is outside \[1, 16\]"):
        GuessNumberEnvironment(demo_secret=17)


# --- python ------------------------------------------------------------------------------------------


def test_truncate():
    assert truncate("abc", 3) == "abc"
    assert truncate("x" * 100, 40) == "x" * 14 + "\n... (86 more characters)"
    assert truncate("x" * 100, 10) == "x" * 10


def test_python_environment_tool_schema_and_stop():
    env = PythonEnvironment(format="tags", timeout=3, max_output=50)
    assert env.stop == ("</python>",)
    assert env.schemas[0]["function"]["name"] == "python"
    assert list(env.schemas[0]["function"]["parameters"]["properties"]) == ["code"]
    assert env.timeout == 60.0 and env.limits.timeout == 3 and env.limits.cpu_seconds == 4
    with pytest.raises(ValueError, match="max_output must be >= 1"):
        PythonEnvironment(max_output=0)


@pytest.fixture(scope="module")
def sandbox():
    from grpo.rewards.sandbox import Limits, run_python

    try:
        works = run_python({"main.py": "print('ok')"}, limits=Limits(timeout=20)).stdout.strip() == "ok"
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"the code sandbox cannot run here: {type(e).__name__}: {e}")
    if not works:
        pytest.skip("the code sandbox cannot run here (a trivial program printed nothing)")


def test_python_episode(sandbox):
    env = PythonEnvironment(format="tags", timeout=5, max_output=200)
    row = {"prompt": "What is the sum of 1..100?", "answer": "5050"}
    turns = ["<python>print(sum(range(101)))</python>", "<python>\n```python\nx = 1\nprint(x)\n1/0\n```\n</python>",
             "<python>import os\nprint(os.getcwd())\nprint('a' * 1000)</python>", "The sum is 5050."]
    first, steps = play(env, row, turns)
    assert "<python>print(2 ** 10)</python>" in first[0]["content"]
    results = [s.messages[0]["content"] for s in steps[:3]]
    assert results[0] == "5050\n"
    assert results[1] == "1\nError: exit code 1: ZeroDivisionError: division by zero"
    assert results[2] == "/sandbox\n" + "a" * 164 + "\n... (837 more characters)"
    assert [(s.reward, s.done, s.tool_calls, s.tool_errors) for s in steps] == [(None, False, 1, 0)] * 3 + [(1.0, True, 0, 0)]


def test_python_episode_timeout_is_answered(sandbox):
    env = PythonEnvironment(format="tags", timeout=1)
    _, steps = play(env, {"prompt": "p"}, ["<python>while True: pass</python>", "done"])
    assert steps[0].messages[0] == {"role": "tool", "content": "Error: timeout: still running after 1 s (wall clock)"}
    assert steps[0].tool_errors == 0  # the program failed, the tool worked
    assert steps[1] == Step([], None, True)


def test_calculator_demonstration_and_result_format():
    """configs/calculator.yaml's episode: the worked example before the question, the verbatim system text, the
    result as a user message "Result: N"."""
    from grpo.envs.calculator import CalculatorEnvironment
    from grpo.testing import tiny_tokenizer

    env = CalculatorEnvironment(format="tags", system="Use <calculator>X</calculator>.", demonstrate=True,
                                example="12 * 34", result_role="user", result_format="Result: {result}")
    env.bind(tiny_tokenizer())
    first = env.reset({"prompt": "Compute 2 * 3.", "answer": "6"}, seed=0)
    assert first == [{"role": "system", "content": "Use <calculator>X</calculator>."},
                     {"role": "user", "content": "Compute 12 * 34. Reply with only the number."},
                     {"role": "assistant", "content": "<calculator>12 * 34</calculator>"},
                     {"role": "user", "content": "Result: 408"},
                     {"role": "assistant", "content": "408"},
                     {"role": "user", "content": "Compute 2 * 3."}]
    step = env.step("<calculator>2 * 3</calculator>")
    assert step.messages == [{"role": "user", "content": "Result: 6"}] and not step.done
    assert env.step("6").reward == 1.0
