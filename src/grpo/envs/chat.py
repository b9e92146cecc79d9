"""Environment messages as tokens that continue a transcript, through the chat template, without decoding and
encoding the model's own tokens again (a transcript rebuilt from text drifts from what was sampled).

After a model turn the template would write the rest of the assistant message (e.g. Qwen's and SmolLM2's
"<|im_end|>\\n"; the EOS part is already sampled when the turn ended with it), then the new messages, then the
generation prompt of the next assistant turn. Those characters are found by rendering a fixed conversation that
ends in an assistant message holding a marker, with and without the new messages: what the template adds is the
text after the marker plus the difference. Only that text is tokenized, once.
"""

from __future__ import annotations

MARK = "GRPO-TURN-MARK-4f1d"
_BASE = [{"role": "user", "content": "U"}, {"role": "assistant", "content": MARK}]


class TemplateError(ValueError):
    pass


def render(tokenizer, messages: list[dict], generation_prompt: bool, tools: list[dict] | None = None) -> str:
    kwargs = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False, **kwargs)


def continuation_text(tokenizer, messages: list[dict], eos_text: str | None, tools: list[dict] | None = None) -> str:
    """The text the chat template puts after a model turn's sampled text: the end of the assistant message (less
    `eos_text`, the EOS the turn ended with, when it did), `messages`, and the next assistant turn's opening."""
    before = render(tokenizer, _BASE, False, tools)
    after = render(tokenizer, _BASE + list(messages), True, tools)
    if not after.startswith(before) or MARK not in before:
        raise TemplateError(
            "the chat template renders a conversation's earlier messages differently once messages follow them, so "
            "environment messages cannot be appended to an episode's tokens; use a model whose template appends "
            "messages (e.g. SmolLM2, Qwen2.5)")
    tail = before[before.rindex(MARK) + len(MARK):]  # e.g. "<|im_end|>\n": the rest of the assistant message
    if eos_text and tail.startswith(eos_text):
        tail = tail[len(eos_text):]
    return tail + after[len(before):]


def continuation_ids(tokenizer, messages: list[dict], ended_with: int | None, tools: list[dict] | None = None,
                     ) -> list[int]:
    """Token ids that append `messages` to a transcript whose last model turn ended with token `ended_with` (the
    EOS, a stop string's last token, or None), ready for the model's next turn. A special token there (the EOS) is
    the start of what the template writes after the message, so that part is not written twice."""
    special = ended_with is not None and ended_with in set(tokenizer.all_special_ids)
    eos_text = tokenizer.decode([ended_with]) if special else None
    return tokenizer(continuation_text(tokenizer, messages, eos_text, tools), add_special_tokens=False).input_ids
