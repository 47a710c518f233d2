"""Rendering prompts and tool observations with the tokenizer's own chat template, in token ids.

The trained sequence of a multi-turn episode is the concatenation of
    prompt ids | sampled assistant ids | observation ids | sampled assistant ids | ... | tail ids
where only the prompt, observation and tail pieces come from the template; the assistant ids
are exactly what the rollout engine sampled and are never decoded and re-encoded. For a
prefix-stable template (the rendering of a conversation is a prefix of the rendering of any
continuation of it, as with ChatML/Qwen/Hermes templates) this concatenation equals the
template's rendering of the whole conversation, token for token.

The observation after an assistant turn is taken as a token difference: render the
conversation with and without the new messages and keep the suffix. The assistant messages
passed in are only used to render around them; their exact text does not matter for the suffix.
"""
from __future__ import annotations

from collections.abc import Sequence


class TemplateNotPrefixStableError(ValueError):
    """The chat template re-renders earlier turns when a message is appended, so token-space
    concatenation would not match what the model sees. Use a prefix-stable template."""


def render_messages(tokenizer, messages, tools=None, add_generation_prompt: bool = False,
                    template_kwargs: dict | None = None) -> list[int]:
    """Token ids of the chat template's rendering of `messages` (the one place that calls it)."""
    template_kwargs = template_kwargs or {}
    ids = tokenizer.apply_chat_template(list(messages), tools=tools, tokenize=True,
                                        add_generation_prompt=add_generation_prompt,
                                        return_dict=False, **template_kwargs)
    if hasattr(ids, "keys"):  # tokenizers that return a BatchEncoding regardless
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def end_of_turn_id(tokenizer, end_of_turn: int | str | None = None) -> int:
    """The id of the token that closes an assistant turn (ChatML: `<|im_end|>`). Defaults to the
    tokenizer's EOS token, which is the end-of-turn token of chat models such as Qwen2.5."""
    if end_of_turn is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token; pass end_of_turn explicitly")
        return int(tokenizer.eos_token_id)
    if isinstance(end_of_turn, str):
        token_id = tokenizer.convert_tokens_to_ids(end_of_turn)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"end_of_turn = {end_of_turn!r} is not a token of this tokenizer")
        return int(token_id)
    return int(end_of_turn)


def _check_assistant_last(messages: Sequence[dict]) -> None:
    if not messages or messages[-1].get("role") != "assistant":
        role = messages[-1].get("role") if messages else None
        raise ValueError(f"messages must end with the assistant turn just sampled "
                         f"(last role: {role!r})")


def _tail_after_end_of_turn(tokenizer, rendered: list[int], eot: int) -> list[int]:
    for i in range(len(rendered) - 1, -1, -1):
        if rendered[i] == eot:
            return rendered[i + 1:]
    raise ValueError(f"the template rendered no end-of-turn token "
                     f"({tokenizer.convert_ids_to_tokens(eot)!r}, id {eot}) after the assistant "
                     "turn; pass the right end_of_turn")


def render_prompt(tokenizer, messages: Sequence[dict], tools: list | None = None,
                  **template_kwargs) -> list[int]:
    """Ids of the first prompt (system + user, with the tool schemas) ending with the
    generation prompt (ChatML: `<|im_start|>assistant\\n`)."""
    return render_messages(tokenizer, messages, tools, True, template_kwargs)


def render_observation(tokenizer, messages: Sequence[dict], new_messages: Sequence[dict],
                       tools: list | None = None, end_of_turn: int | str | None = None,
                       assistant_ids: Sequence[int] | None = None,
                       **template_kwargs) -> list[int]:
    """Ids that follow a sampled assistant turn up to the next generation prompt.

    `messages` is the conversation so far, ending with that assistant turn; `new_messages` are
    the tool results (and/or user messages) that come next. The result is what the template
    puts after the turn's end-of-turn token (ChatML: the newline), then the new messages, then
    the generation prompt. With `assistant_ids` (the sampled ids of that turn), also checks the
    turn really ended with the end-of-turn token: a truncated turn cannot be continued.
    """
    _check_assistant_last(messages)
    eot = end_of_turn_id(tokenizer, end_of_turn)
    if assistant_ids is not None and (len(assistant_ids) == 0 or int(assistant_ids[-1]) != eot):
        last = int(assistant_ids[-1]) if len(assistant_ids) else None
        raise ValueError(f"the sampled assistant turn ends with id {last}, not the end-of-turn "
                         f"id {eot}: it was truncated and cannot be followed by an observation")
    before = render_messages(tokenizer, messages, tools, False, template_kwargs)
    after = render_messages(tokenizer, list(messages) + list(new_messages), tools, True, template_kwargs)
    if after[:len(before)] != before:
        at = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), len(after))
        raise TemplateNotPrefixStableError(
            f"the chat template is not prefix-stable: appending {len(new_messages)} message(s) "
            f"changed the rendering at token {at} (before: "
            f"{tokenizer.decode(before[max(0, at - 8):at + 8])!r}, after: "
            f"{tokenizer.decode(after[max(0, at - 8):at + 8])!r})")
    return _tail_after_end_of_turn(tokenizer, before, eot) + after[len(before):]


def render_turn_tail(tokenizer, messages: Sequence[dict], tools: list | None = None,
                     end_of_turn: int | str | None = None, **template_kwargs) -> list[int]:
    """Ids the template puts after the end-of-turn token of the final assistant turn (ChatML:
    the newline). Appending them (untrained) makes the trajectory equal the full rendering."""
    _check_assistant_last(messages)
    eot = end_of_turn_id(tokenizer, end_of_turn)
    return _tail_after_end_of_turn(tokenizer, render_messages(tokenizer, messages, tools, False,
                                                      template_kwargs), eot)
