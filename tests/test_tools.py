"""The tool environment's parts (grpo.envs.tools): schemas and formats, parsing calls (pure), running
them (timeouts, errors), and ToolEnvironment's turns. Episodes of the built-ins: tests/test_envs.py."""

import threading

import pytest

from grpo.envs import EnvironmentLoadError, Step, ToolEnvironment, load_tools
from grpo.envs.tools import (
    TAGS_INSTRUCTIONS,
    ToolCall,
    ToolError,
    convert_value,
    describe_tools,
    parse_tag_calls,
    parse_template_calls,
    resolve_format,
    result_text,
    run_tool,
    tag_arguments,
    template_uses_tools,
    tool_schema,
)
from grpo.testing import tiny_tokenizer


def add(a: int, b: float = 0.0) -> float:
    """Add two numbers.

    Args:
        a: the first number
        b: the second number
    """
    return a + b


def shout(text: str) -> str:
    """Repeat a text in capitals.

    Args:
        text: what to repeat
    """
    return text.upper()


def lookup(key: str) -> dict:
    """Look a key up.

    Args:
        key: the key
    """
    if key == "boom":
        raise KeyError(key)
    return {"key": key, "values": [1, 2]}


def no_hints(x):
    """Nothing."""


PARAMS = {s["function"]["name"]: s["function"]["parameters"] for s in map(tool_schema, [add, shout])}


class FakeTokenizer:
    def __init__(self, chat_template):
        self.chat_template = chat_template


# --- schemas and formats -------------------------------------------------------------------------------


def test_tool_schema_is_transformers():
    assert tool_schema(add) == {"type": "function", "function": {
        "name": "add", "description": "Add two numbers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer", "description": "the first number"},
                                                         "b": {"type": "number", "description": "the second number"}},
                       "required": ["a"]},
        "return": {"type": "number"}}}
    with pytest.raises(ValueError, match="tool 'no_hints': transformers cannot derive its JSON schema: Argument x is "
                                         "missing a type hint in function no_hints"):
        tool_schema(no_hints)


def test_template_uses_tools_and_resolve_format():
    with_tools = FakeTokenizer("{% if tools %}{{ tools | tojson }}{% endif %}{{ messages }}")
    without = FakeTokenizer("{{ messages }}{# toolset #}")
    assert template_uses_tools(with_tools) and not template_uses_tools(without)
    assert template_uses_tools(FakeTokenizer({"default": "x", "tool_use": "{{ tools }}"}))
    assert not template_uses_tools(FakeTokenizer(None))
    assert [resolve_format(f, with_tools) for f in ("auto", "template", "tags")] == ["template", "template", "tags"]
    assert [resolve_format(f, without) for f in ("auto", "tags")] == ["tags", "tags"]
    with pytest.raises(ValueError, match="tool format 'template', but this tokenizer's chat template does not render tools"):
        resolve_format("template", without)
    with pytest.raises(ValueError, match="tool format 'json' is not one of auto, template, tags"):
        resolve_format("json", without)


def test_describe_tools():
    text = describe_tools([tool_schema(add), tool_schema(shout)], examples={"shout": "hello"})
    assert text == TAGS_INSTRUCTIONS + (
        "\n\nTools:\n"
        "- add: Add two numbers.\n"
        "  a (integer): the first number\n"
        "  b (number, optional): the second number\n"
        '  Call: <add>{"a": 1, "b": 1.5}</add>\n'
        "- shout: Repeat a text in capitals.\n"
        "  text (string): what to repeat\n"
        "  Call: <shout>hello</shout>"
    )
    assert describe_tools([tool_schema(shout)], instructions="Use:").endswith("Call: <shout>TEXT</shout>")


# --- parsing -------------------------------------------------------------------------------------------------


def test_parse_template_calls():
    text = ('Let me add. <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call> and '
            '<tool_call>{"name": "shout", "parameters": {"text": "hi"}}</tool_call>')
    assert parse_template_calls(text) == [ToolCall("add", {"a": 1, "b": 2}), ToolCall("shout", {"text": "hi"})]
    assert parse_template_calls('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>') == [ToolCall("f", {"x": 1})]
    assert parse_template_calls('<tool_call>{"name": "f"}</tool_call>') == [ToolCall("f", {})]
    assert parse_template_calls("The answer is 3. <answer>3</answer>") == []


@pytest.mark.parametrize(
    "text, name, error",
    [
        ("<tool_call>{name: f}</tool_call>", None, "the call is not valid JSON (Expecting property name enclosed"),
        ('<tool_call>{"arguments": {}}</tool_call>', None, 'the call has no "name"'),
        ('<tool_call>["f"]</tool_call>', None, 'the call has no "name"'),
        ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', "f", "the arguments must be a JSON object, got [1]"),
        ('<tool_call>{"name": "f", "arguments": "{x"}</tool_call>', "f", "the arguments are not valid JSON"),
        ('<tool_call>{"name": "f", "arguments": {"x": 1', None, "the call has no closing </tool_call>"),
    ],
)
def test_parse_template_calls_malformed(text, name, error):
    (call,) = parse_template_calls(text)
    assert call.name == name and call.arguments is None and call.error.startswith(error)


def test_parse_tag_calls():
    text = "First <shout> hello there </shout>, then <add>{\"a\": 2, \"b\": 0.5}</add>; <answer>x</answer> <other>1</other>"
    assert parse_tag_calls(text, PARAMS) == [ToolCall("shout", {"text": "hello there"}), ToolCall("add", {"a": 2, "b": 0.5})]
    assert parse_tag_calls("no calls <answer>4</answer>", PARAMS) == []
    assert parse_tag_calls("<shout>a</shout>", {}) == []
    assert parse_tag_calls("<shout>\n<shout>x\n</shout>", PARAMS) == [ToolCall("shout", {"text": "<shout>x"})]


def test_parse_tag_calls_malformed():
    assert parse_tag_calls("<add>1, 2</add>", PARAMS)[0].error.startswith(
        'the arguments must be a JSON object like {"a": ...} (Extra data')
    assert parse_tag_calls("<add>[1, 2]</add>", PARAMS)[0].error == "the arguments must be a JSON object, got '[1, 2]'"
    assert parse_tag_calls("<shout>hi</shout> <add>{\"a\": 1", PARAMS) == [
        ToolCall("shout", {"text": "hi"}), ToolCall("add", None, "the call has no closing </add>")]


def test_tag_arguments_convert_a_single_parameter_to_its_type():
    one = lambda t: {"type": "object", "properties": {"x": {"type": t}}}  # noqa: E731
    assert tag_arguments(" 12 ", one("integer")) == {"x": 12}
    assert tag_arguments("12.0", one("integer")) == {"x": 12}
    assert tag_arguments("2.5", one("number")) == {"x": 2.5}
    assert tag_arguments("3", one("number")) == {"x": 3}
    assert tag_arguments("True", one("boolean")) == {"x": True}
    assert tag_arguments(" 12 * 3 \n", one("string")) == {"x": "12 * 3"}
    assert tag_arguments("[1, 2]", one("array")) == {"x": [1, 2]}
    assert tag_arguments("anything", {"type": "object", "properties": {}}) == {}
    with pytest.raises(ValueError, match="'2.5' is not of type integer"):
        tag_arguments("2.5", one("integer"))


def test_convert_value():
    assert convert_value("7", ["integer", "string"]) == 7
    assert convert_value("seven", ["integer", "string"]) == "seven"
    assert convert_value("null", ["null"]) is None
    assert convert_value('{"a": 1}', ["object"]) == {"a": 1}
    with pytest.raises(ValueError, match="'maybe' is not of type boolean"):
        convert_value("maybe", ["boolean"])
    with pytest.raises(ValueError, match=r"'\[1\]' is not of type object"):
        convert_value("[1]", ["object"])


# --- running -----------------------------------------------------------------------------------------------


def test_result_text():
    assert [result_text(v) for v in ("plain", 3, 2.5, None, {"k": [1, "é"]}, (1,), {3})] == [
        "plain", "3", "2.5", "null", '{"k": [1, "é"]}', "[1]", '"{3}"']


def test_run_tool():
    assert run_tool(add, {"a": 1, "b": 2.5}, timeout=10) == "3.5"
    assert run_tool(lookup, {"key": "k"}, timeout=10) == '{"key": "k", "values": [1, 2]}'
    with pytest.raises(ToolError, match="^wrong arguments for add: missing a required argument: 'a'$"):
        run_tool(add, {"b": 1}, timeout=10)
    with pytest.raises(ToolError, match="^wrong arguments for add: got an unexpected keyword argument 'c'$"):
        run_tool(add, {"a": 1, "c": 1}, timeout=10)
    with pytest.raises(ToolError, match="^lookup raised KeyError: 'boom'$"):
        run_tool(lookup, {"key": "boom"}, timeout=10)


def test_run_tool_async():
    async def double(x: int) -> int:
        """Double.

        Args:
            x: a number
        """
        return 2 * x

    assert run_tool(double, {"x": 4}, timeout=10) == "8"


def test_run_tool_timeout_answers_and_leaves_the_thread():
    release = threading.Event()

    def stuck(x: int) -> int:
        release.wait()
        return x

    with pytest.raises(ToolError, match="^stuck timed out after 0.05 s$"):
        run_tool(stuck, {"x": 1}, timeout=0.05)
    release.set()  # the thread was never killed; it ends now


# --- the environment ----------------------------------------------------------------------------------------


def test_tool_environment_refuses_bad_construction():
    with pytest.raises(ValueError, match="needs at least one tool"):
        ToolEnvironment([])
    with pytest.raises(ValueError, match="format 'json' is not one of auto, template, tags"):
        ToolEnvironment([add], format="json")
    with pytest.raises(ValueError, match="timeout must be > 0"):
        ToolEnvironment([add], timeout=0)
    with pytest.raises(ValueError, match="two tools share a name"):
        ToolEnvironment([add, add])
    with pytest.raises(ValueError, match="tool 'no_hints'"):
        ToolEnvironment([no_hints])


def test_auto_format_needs_bind():
    env = ToolEnvironment([add])
    assert env.stop == ()
    with pytest.raises(RuntimeError, match=r"call bind\(tokenizer\) before reset/step"):
        env.reset({"prompt": "p"}, 0)
    env.bind(tiny_tokenizer())
    assert env.call_format == "tags" and env.stop == ("</add>",)
    env.bind(FakeTokenizer("{{ tools }}"))
    assert env.call_format == "template" and env.stop == ("</tool_call>",)


def test_template_tools():
    env = ToolEnvironment([add, shout])
    assert env.template_tools(FakeTokenizer("{{ tools }}")) == [tool_schema(add), tool_schema(shout)]
    assert env.template_tools(tiny_tokenizer()) is None
    assert ToolEnvironment([add], format="tags").template_tools(FakeTokenizer("{{ tools }}")) is None


def test_reset_tags_adds_the_description_to_the_system_message():
    env = ToolEnvironment([add, shout], format="tags")
    description = describe_tools(env.schemas)
    assert env.reset({"prompt": "hi"}, 0) == [{"role": "system", "content": description}, {"role": "user", "content": "hi"}]
    env.system_prompt = "Be brief."
    assert env.reset({"prompt": "hi"}, 0)[0] == {"role": "system", "content": "Be brief.\n\n" + description}
    row = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}]}
    assert env.reset(row, 0)[0]["content"] == "S\n\n" + description
    assert row["prompt"][0]["content"] == "S"  # the row is not changed
    assert ToolEnvironment([add], format="template").reset({"prompt": "hi"}, 0) == [{"role": "user", "content": "hi"}]


def test_step_template_format_answers_every_call_and_counts_errors():
    env = ToolEnvironment([add, lookup], format="template", result_role="user")
    text = ('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
            '<tool_call>{"name": "nope", "arguments": {}}</tool_call>'
            '<tool_call>{"name": "lookup", "arguments": {"key": "boom"}}</tool_call>'
            '<tool_call>{"name": "add", "arguments": {"a": "x", "b": 1}}</tool_call>'
            '<tool_call>{"name": "add", "arguments": {"z": 1}}</tool_call>'
            '<tool_call>oops</tool_call>')
    step = env.step(text)
    assert step.messages == [
        {"role": "user", "content": "1.0", "name": "add"},
        {"role": "user", "content": "Error: unknown tool 'nope'; the tools are: add, lookup", "name": "nope"},
        {"role": "user", "content": "Error: lookup raised KeyError: 'boom'", "name": "lookup"},
        {"role": "user", "content": 'Error: add raised TypeError: can only concatenate str (not "int") to str', "name": "add"},
        {"role": "user", "content": "Error: wrong arguments for add: missing a required argument: 'a'", "name": "add"},
        {"role": "user", "content": "Error: malformed call: the call is not valid JSON (Expecting value: line 1 column 1 "
                                    "(char 0)); write <tool_call>{\"name\": \"TOOL\", \"arguments\": {...}}</tool_call>"},
    ]
    assert (step.reward, step.done, step.tool_calls, step.tool_errors) == (None, False, 6, 5)


def test_step_tags_format():
    env = ToolEnvironment([add, shout], format="tags")
    assert env.step("<shout>hi</shout>") == Step([{"role": "tool", "content": "HI"}], None, False, 1, 0)
    assert env.step("<add>{\"a\": 2}</add><shout>x") == Step(
        [{"role": "tool", "content": "2.0"}, {"role": "tool", "content": "Error: malformed call to shout: the call has no "
                                                                          "closing </shout>"}], None, False, 2, 1)
    assert env.step("The answer is 4.") == Step([], None, True, 0, 0)


def test_final_hook_and_answer_column():
    class Scored(ToolEnvironment):
        def final(self, text):
            return float(len(text))

    assert Scored([add], format="tags").step("four") == Step([], 4.0, True)
    env = ToolEnvironment([add], format="tags", answer_column="solution")
    env.reset({"prompt": "p", "solution": "12"}, 0)
    assert env.step("It is 12.").reward == 1.0 and env.step("It is 13.").reward == 0.0
    env.reset({"prompt": "p"}, 0)
    assert env.step("It is 12.").reward is None


# --- loading tools from the config ---------------------------------------------------------------------------


TOOLS_FILE = '''
def add(a: int, b: int) -> int:
    """Add.

    Args:
        a: first
        b: second
    """
    return a + b


def untyped(x):
    """Untyped."""


NOT_A_FUNCTION = 3
'''


def test_load_tools(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_tools.py").write_text(TOOLS_FILE)
    (fn,) = load_tools(["my_tools.py:add"])
    assert fn.__name__ == "add" and fn(2, 3) == 5
    assert load_tools(["grpo.envs.calculator:calculator"])[0]("2*3") == "6"
    cases = {
        "my_tools.py:untyped": "tool 'my_tools.py:untyped': transformers cannot derive its JSON schema: Argument x is "
                               "missing a type hint in function untyped",
        "my_tools.py:NOT_A_FUNCTION": "tool 'my_tools.py:NOT_A_FUNCTION' is a int, not a function",
        "my_tools.py:sub": "tool 'my_tools.py:sub': my_tools.py has no 'sub'; names there: NOT_A_FUNCTION, add, untyped",
        "other.py:add": "tool 'other.py:add': no such file other.py",
        "format": "tool 'format': write it as path/to/file.py:name or package.module:name",
    }
    for name, message in cases.items():
        with pytest.raises(EnvironmentLoadError) as info:
            load_tools([name])
        assert str(info.value).startswith(message), (name, str(info.value))
