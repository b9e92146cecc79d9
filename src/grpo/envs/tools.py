"""The default tool environment: plain typed Python functions as tools, their calls parsed from the
model's text, run with a timeout, and answered with tool messages.

A tool is any function with type hints and a Google-style docstring (its JSON schema is derived by
`transformers.utils.get_json_schema`, the schema chat templates render):

    def add(a: int, b: int) -> int:
        \"\"\"Add two whole numbers.

        Args:
            a: the first number
            b: the second number
        \"\"\"
        return a + b

Two ways the model calls tools (`format`):
- "template": the chat template renders the schemas (`tools=`, see `template_tools`) and the model
  writes Hermes/Qwen calls, `<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>`
  (several in one turn allowed); the model's turn stops at `</tool_call>`.
- "tags": for models whose chat template knows no tools (e.g. the default SmolLM2): `reset` describes
  the tools in the system message, and a call is `<NAME>ARG</NAME>`, ARG being the argument's value
  for a one-parameter tool (`<calculator>12 * 34</calculator>`), else a JSON object of the arguments
  (`<add>{"a": 1, "b": 2}</add>`); the model's turn stops at `</NAME>` for each tool. Only the tools'
  own names are calls (any other tag, e.g. `<answer>`, is plain text).
- "auto" (default): "template" when the tokenizer's chat template mentions `tools`, else "tags".

A turn with no tool call is the final answer: the episode ends and `final(text)` gives its reward.
Errors (a malformed call, an unknown tool, wrong arguments, a tool that raises or runs past `timeout`)
never leave `step`: they are answered to the model as a tool message that says what went wrong, so
it can learn from it, and counted in `Step.tool_errors`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

from grpo.envs.base import Environment, EnvironmentLoadError, Step, load_attribute

Format = Literal["auto", "template", "tags"]
FORMATS = ("auto", "template", "tags")
"""The tool-call formats (see the module docstring)."""

TAGS_INSTRUCTIONS = (
    "You can use tools. To call one, write the call as shown below and stop; its result comes back in the "
    "next message. When you know the final answer, reply with it and without a tool call."
)
"""The header of the tool description that the "tags" format puts in the system message."""


# --- schemas and formats ----------------------------------------------------------------------------


def tool_schema(fn: Callable, label: str | None = None) -> dict:
    """The tool's JSON schema as transformers derives it (type hints + Google-style docstring):
    {"type": "function", "function": {"name", "description", "parameters": {...}}}.
    Raises ValueError naming the tool (`label`, default its name) and transformers' reason."""
    from transformers.utils import get_json_schema

    name = label or getattr(fn, "__name__", repr(fn))
    try:
        return get_json_schema(fn)
    except Exception as e:
        raise ValueError(
            f"tool {name!r}: transformers cannot derive its JSON schema: {e} (give every parameter a type hint "
            "and a Google-style docstring with a description and an 'Args:' line per parameter)"
        ) from None


def template_uses_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders `tools` (its text mentions the variable)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    texts = template.values() if isinstance(template, dict) else [template]
    return any(re.search(r"\btools\b", t or "") for t in texts)


def resolve_format(format: str, tokenizer) -> Literal["template", "tags"]:
    """The call format a ToolEnvironment uses with this tokenizer ("auto": template when the chat template
    renders tools, else tags). Raises ValueError for "template" with a chat template that has no tools."""
    if format not in FORMATS:
        raise ValueError(f"tool format {format!r} is not one of {', '.join(FORMATS)}")
    if format == "tags":
        return "tags"
    uses = template_uses_tools(tokenizer)
    if format == "template" and not uses:
        raise ValueError(
            "tool format 'template', but this tokenizer's chat template does not render tools "
            "(it never mentions `tools`); use format 'tags' (or 'auto', which picks it)"
        )
    return "template" if uses else "tags"


def _example(name: str, parameters: dict, example: str | None) -> str:
    """An example call in the tags format: <NAME>ARG</NAME>, or <NAME>{json}</NAME> for several parameters."""
    props = parameters.get("properties", {})
    if example is None:
        samples = {"string": "...", "integer": 1, "number": 1.5, "boolean": True, "array": [], "object": {}}
        if len(props) == 1:
            example = next(iter(props)).upper()
        else:
            example = json.dumps({k: samples.get(_types(v)[0], "...") for k, v in props.items()})
    return f"<{name}>{example}</{name}>"


def describe_tools(schemas: list[dict], examples: dict[str, str] | None = None, instructions: str = TAGS_INSTRUCTIONS) -> str:
    """The tags format's tool description (for the system message): each tool's name, description,
    parameters and an example call. `examples`: tool name -> the ARG text of its example call."""
    lines = [instructions, "", "Tools:"]
    for schema in schemas:
        f = schema["function"]
        params = f.get("parameters", {})
        required = set(params.get("required", []))
        lines.append(f"- {f['name']}: {f.get('description', '').strip()}")
        for pname, p in params.get("properties", {}).items():
            kind = "/".join(_types(p)) + ("" if pname in required else ", optional")
            lines.append(f"  {pname} ({kind}): {p.get('description', '').strip()}")
        lines.append(f"  Call: {_example(f['name'], params, (examples or {}).get(f['name']))}")
    return "\n".join(lines)


def _types(prop: dict) -> list[str]:
    t = prop.get("type", "string")
    return list(t) if isinstance(t, list) else [t]


# --- parsing calls (pure) -----------------------------------------------------------------------------


@dataclass
class ToolCall:
    """One tool call parsed from the model's text; `error` says why it cannot run (then name or
    arguments may be None)."""

    name: str | None
    arguments: dict | None
    error: str | None = None


_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def parse_template_calls(text: str) -> list[ToolCall]:
    """Hermes/Qwen calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, in order; an
    unclosed `<tool_call>` at the end is a malformed call. ("parameters" is read as "arguments", and
    arguments given as a JSON string are decoded.)"""
    calls, end = [], 0
    for m in _TOOL_CALL.finditer(text):
        calls.append(_template_call(m.group(1)))
        end = m.end()
    if "<tool_call>" in text[end:]:
        calls.append(ToolCall(None, None, "the call has no closing </tool_call>"))
    return calls


def _template_call(body: str) -> ToolCall:
    usage = 'write <tool_call>{"name": "TOOL", "arguments": {...}}</tool_call>'
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCall(None, None, f"the call is not valid JSON ({e}); {usage}")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return ToolCall(None, None, f"the call has no \"name\"; {usage}")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            return ToolCall(obj["name"], None, f"the arguments are not valid JSON ({e})")
    if not isinstance(args, dict):
        return ToolCall(obj["name"], None, f"the arguments must be a JSON object, got {json.dumps(args)}; {usage}")
    return ToolCall(obj["name"], args)


def parse_tag_calls(text: str, parameters: dict[str, dict]) -> list[ToolCall]:
    """Tags-format calls `<NAME>ARG</NAME>` of the tools in `parameters` (tool name -> its JSON-schema
    "parameters" object), in order; an unclosed `<NAME>` after the last call is a malformed call."""
    if not parameters:
        return []
    names = "|".join(re.escape(n) for n in parameters)
    calls, end = [], 0
    for m in re.finditer(rf"<({names})>(.*?)</\1>", text, re.DOTALL):
        name = m.group(1)
        try:
            calls.append(ToolCall(name, tag_arguments(m.group(2), parameters[name])))
        except ValueError as e:
            calls.append(ToolCall(name, None, str(e)))
        end = m.end()
    unclosed = re.search(rf"<({names})>", text[end:])
    if unclosed:
        calls.append(ToolCall(unclosed.group(1), None, f"the call has no closing </{unclosed.group(1)}>"))
    return calls


def tag_arguments(body: str, parameters: dict) -> dict:
    """The arguments of a tags-format call from the text between the tags: one parameter: the text,
    stripped, converted to its JSON-schema type; none: {}; several: a JSON object. Raises ValueError."""
    props = parameters.get("properties", {})
    if not props:
        return {}
    if len(props) == 1:
        (name, prop), = props.items()
        return {name: convert_value(body.strip(), _types(prop))}
    try:
        args = json.loads(body)
    except json.JSONDecodeError as e:
        raise ValueError(f"the arguments must be a JSON object like {{\"{next(iter(props))}\": ...}} ({e})") from None
    if not isinstance(args, dict):
        raise ValueError(f"the arguments must be a JSON object, got {body.strip()!r}")
    return args


def convert_value(text: str, types: Sequence[str]) -> Any:
    """`text` as a value of the first JSON-schema type that fits (strings stay text). Raises ValueError."""
    for t in types:
        if t == "string":
            return text
        try:
            return _CONVERT[t](text)
        except (ValueError, KeyError, json.JSONDecodeError):
            continue
    raise ValueError(f"{text!r} is not of type {' or '.join(types)}")


def _integer(text: str) -> int:
    value = float(text)  # "12", "12.0", "1e3"
    if not value.is_integer():
        raise ValueError(text)
    return int(value)


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _json_of(kind: type) -> Callable[[str], Any]:
    def convert(text: str):
        value = json.loads(text)
        if not isinstance(value, kind):
            raise ValueError(text)
        return value

    return convert


_CONVERT: dict[str, Callable[[str], Any]] = {
    "integer": _integer,
    "number": _number,
    "boolean": lambda s: {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}[s.lower()],
    "array": _json_of(list),
    "object": _json_of(dict),
    "null": lambda s: {"null": None, "none": None, "": None}[s.lower()],
}


# --- running calls ------------------------------------------------------------------------------------


class ToolError(Exception):
    """A call that could not run or failed; the message is what the model is told."""


def result_text(value: Any) -> str:
    """A tool's return value as the text the model reads: a str as it is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def run_tool(fn: Callable, arguments: dict, timeout: float) -> str:
    """Call `fn(**arguments)` (awaited if it is async) in a worker thread, waiting at most `timeout`
    seconds, and return its result as text. Raises ToolError for wrong arguments, an exception, or a
    timeout. A Python thread cannot be killed: a call past its timeout keeps running in its (daemon)
    thread until it returns, its result dropped; a tool that may hang should limit itself (e.g. run
    its work in a subprocess with a timeout, as the `python` environment does)."""
    name = getattr(fn, "__name__", "tool")
    try:
        inspect.signature(fn).bind(**arguments)
    except TypeError as e:
        raise ToolError(f"wrong arguments for {name}: {e}") from None
    box: dict[str, Any] = {}

    def work():
        try:
            out = fn(**arguments)
            box["value"] = asyncio.run(_wait(out)) if inspect.isawaitable(out) else out
        except BaseException as e:  # noqa: BLE001  (reported to the model, whatever it is)
            box["error"] = e

    thread = threading.Thread(target=work, name=f"tool-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise ToolError(f"{name} timed out after {timeout:g} s")
    if "error" in box:
        e = box["error"]
        raise ToolError(f"{name} raised {type(e).__name__}: {e}")
    return result_text(box["value"])


async def _wait(awaitable):
    return await awaitable


def load_tools(names: Sequence[str]) -> list[Callable]:
    """The functions that config entries name (`path/to/file.py:function` or `package.module:function`),
    each checked to be callable and to have a JSON schema. Raises EnvironmentLoadError naming the tool."""
    tools = []
    for name in names:
        fn = load_attribute(name, "tool")
        if not callable(fn):
            raise EnvironmentLoadError(f"tool {name!r} is a {type(fn).__name__}, not a function")
        try:
            tool_schema(fn, label=name)
        except ValueError as e:
            raise EnvironmentLoadError(str(e)) from None
        tools.append(fn)
    return tools


# --- the environment ------------------------------------------------------------------------------------


class ToolEnvironment(Environment):
    """The default tool environment: the model calls `tools` until it answers without a call.

    Args:
        tools: the tool functions (type hints + Google-style docstrings; see the module docstring).
        format: "auto" | "template" | "tags": how the tools are shown and the calls written (module docstring).
        timeout: seconds each call may run (a call past it is answered as an error; see run_tool).
        result_role: the role of the messages that answer calls ("tool"; "user" for chat templates that
            reject a "tool" role).
        examples: tool name -> the ARG text of its example call in the tags description (default: the
            parameter's name in capitals, or a JSON object for several parameters).
        instructions: the header of the tags description (default TAGS_INSTRUCTIONS).
        system: with the tags format, this system text instead of the generated description (written as is:
            a small model may follow a short plain sentence better than a list of schemas).
        result_format: the text of a result message, "{result}" replaced by the tool's result (e.g.
            "Result: {result}").
        demonstration: chat messages put between the system message and the row's prompt: a worked example
            of a call and its use, which a small model may need before it calls a tool at all.
        answer_column: when set, `final` scores the final answer against this column of the row
            (the `answer_accuracy` reward: its <answer>, \\boxed{} or last number); None when the row has none.

    Subclasses decide the final turn's reward by overriding `final(text)`.
    """

    def __init__(
        self,
        tools: Sequence[Callable] = (),
        format: Format = "auto",
        timeout: float = 10.0,
        result_role: str = "tool",
        examples: dict[str, str] | None = None,
        instructions: str = TAGS_INSTRUCTIONS,
        answer_column: str | None = None,
        system: str | None = None,
        result_format: str = "{result}",
        demonstration: Sequence[dict] = (),
    ):
        if format not in FORMATS:
            raise ValueError(f"ToolEnvironment: format {format!r} is not one of {', '.join(FORMATS)}")
        if not tools:
            raise ValueError("ToolEnvironment needs at least one tool (environment.tools)")
        if not timeout > 0:
            raise ValueError(f"ToolEnvironment: timeout must be > 0 seconds, got {timeout}")
        self.schemas = [tool_schema(fn) for fn in tools]
        names = [s["function"]["name"] for s in self.schemas]
        if len(set(names)) != len(names):
            raise ValueError(f"ToolEnvironment: two tools share a name: {names}")
        self.tools = dict(zip(names, tools))
        self.format, self.timeout, self.result_role = format, timeout, result_role
        self.examples, self.instructions, self.answer_column = dict(examples or {}), instructions, answer_column
        if "{result}" not in result_format:
            raise ValueError(f"ToolEnvironment: result_format {result_format!r} must contain {{result}}")
        self.system, self.result_format, self.demonstration = system, result_format, [dict(m) for m in demonstration]
        self.call_format: Literal["template", "tags"] | None = None if format == "auto" else format
        self.answer = None
        self._set_stop()

    def bind(self, tokenizer) -> None:
        """Resolve the call format from the tokenizer's chat template and set `stop` accordingly."""
        self.call_format = resolve_format(self.format, tokenizer)
        self._set_stop()

    def _set_stop(self) -> None:
        if self.call_format == "template":
            self.stop = ("</tool_call>",)
        elif self.call_format == "tags":
            self.stop = tuple(f"</{name}>" for name in self.tools)

    def _format(self) -> str:
        if self.call_format is None:
            raise RuntimeError(f"{type(self).__name__} with format 'auto': call bind(tokenizer) before reset/step")
        return self.call_format

    def template_tools(self, tokenizer) -> list[dict] | None:
        """The tools' schemas when the format resolves to "template" for this tokenizer, else None.
        Raises ValueError for format "template" with a chat template that renders no tools."""
        return self.schemas if resolve_format(self.format, tokenizer) == "template" else None

    def reset(self, row: dict, seed: int) -> list[dict]:
        """The row's prompt; with the tags format, the tool description is added to the system message
        (after an existing one, or as a new first message). Keeps the row's `answer_column`, if any."""
        self.answer = row.get(self.answer_column) if self.answer_column else None
        messages = self.prompt_messages(row)
        system = 1 if messages and messages[0].get("role") == "system" else 0
        messages[system:system] = [dict(m) for m in self.demonstration]
        if self._format() == "tags":
            text = self.system or describe_tools(self.schemas, self.examples, self.instructions)
            if system:
                messages[0]["content"] = f"{messages[0]['content']}\n\n{text}"
            else:
                messages.insert(0, {"role": "system", "content": text})
        return messages

    def parse_calls(self, text: str) -> list[ToolCall]:
        """The tool calls in a model turn, in the resolved format."""
        if self._format() == "template":
            return parse_template_calls(text)
        return parse_tag_calls(text, {n: s["function"].get("parameters", {}) for n, s in zip(self.tools, self.schemas)})

    def step(self, text: str) -> Step:
        """Run the turn's tool calls and answer each with a message; no call: the episode ends, reward final(text)."""
        calls = self.parse_calls(text)
        if not calls:
            return Step(reward=self.final(text), done=True)
        messages, errors = [], 0
        for call in calls:
            try:
                content = self.call(call)
            except ToolError as e:
                content, errors = f"Error: {e}", errors + 1
            messages.append(self.result_message(call, content))
        return Step(messages=messages, tool_calls=len(calls), tool_errors=errors)

    def call(self, call: ToolCall) -> str:
        """One parsed call's result text. Raises ToolError (malformed, unknown tool, wrong arguments, raised, timeout)."""
        if call.error is not None:
            raise ToolError(f"malformed call{f' to {call.name}' if call.name else ''}: {call.error}")
        if call.name not in self.tools:
            raise ToolError(f"unknown tool {call.name!r}; the tools are: {', '.join(self.tools)}")
        return run_tool(self.tools[call.name], call.arguments or {}, self.timeout)

    def result_message(self, call: ToolCall, content: str) -> dict:
        """The message that answers a call (role `result_role`; with the template format also its "name")."""
        message = {"role": self.result_role, "content": self.result_format.replace("{result}", content)}
        if self._format() == "template" and call.name:
            message["name"] = call.name
        return message

    def final(self, text: str) -> float | None:
        """The reward of the final turn (a turn without a tool call): with `answer_column`, 1.0 when its
        answer matches the row's, 0.0 when not, None when the row has none; else None. Override it."""
        if self.answer_column is None:
            return None
        from grpo.rewards.builtin import answer_accuracy

        return answer_accuracy([text], [self.answer])[0]
