"""Templates: how a record becomes text, cut into segments that are scored or not.

`Template` is the paper's text template: [(prompt, unscored), (output, scored)]. `ChatTemplate`
renders the record's conversation with the tokenizer's own chat template and cuts it at its
assistant messages (docs/ARCHITECTURE.md, "Chat data"): for assistant message k the scored text is
render(m_1..m_k) minus render(m_1..m_{k-1}, add_generation_prompt=True), the text between is
unscored. Each segment is tokenized on its own, so the scored spans are exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from nuggets_jax.data.files import DataError
from nuggets_jax.data.records import Record

TEMPLATES = ("text", "chat")
SCORE_TURNS = ("all", "last")
Segments = list[tuple[str, bool]]


@dataclasses.dataclass(frozen=True)
class Template:
    """Prompt templates with `{instruction}` / `{input}`; the response is the stripped output."""

    prompt_no_input: str = "Instruction:\n{instruction}\nResponse:\n"
    prompt_with_input: str = "Instruction:\n{instruction}\nInput:\n{input}\nResponse:\n"
    kind = "text"

    @classmethod
    def from_config(cls, data_config: Mapping[str, Any]) -> Template:
        """The template of a config's `data` section (`prompt_no_input`, `prompt_with_input`)."""
        return cls(data_config["prompt_no_input"], data_config["prompt_with_input"])

    def prompt(self, record: Record) -> str:
        if record.format != "alpaca":
            raise DataError(
                f"record {record.id!r} is a conversation ({record.format}); the text template reads "
                "instruction/input/output only. Set data.template=chat to render it with the model's chat template."
            )
        if record.input:
            return self.prompt_with_input.format(instruction=record.instruction, input=record.input)
        return self.prompt_no_input.format(instruction=record.instruction)

    def segments(self, record: Record, last_only: bool = False) -> Segments:
        del last_only  # one response
        return [(self.prompt(record), False), (record.output, True)]

    def full_text(self, record: Record) -> str:
        return self.prompt(record) + record.output

    def describe(self) -> list[str]:
        """What identifies the template in a workdir's fingerprint."""
        return [self.prompt_no_input, self.prompt_with_input]


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """The tokenizer's chat template, cut at the assistant messages.

    Attributes:
      tokenizer: a transformers tokenizer whose `chat_template` is set.
      name: where the template came from (for messages).
    """

    tokenizer: Any
    name: str = "the tokenizer's chat template"
    kind = "chat"

    @classmethod
    def of(cls, tokenizer, name: str) -> ChatTemplate:
        """The chat template of `tokenizer`; `name` is the model (said when it has none)."""
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                f"{name}: the tokenizer has no chat template (no chat_template in tokenizer_config.json "
                "or tokenizer.chat_template in the GGUF); use data.template=text or a chat model."
            )
        return cls(tokenizer, f"the chat template of {name}")

    def render(self, messages, generation: bool = False) -> str:
        chat = [{"role": role, "content": content} for role, content in messages]
        return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation)

    def segments(self, record: Record, last_only: bool = False) -> Segments:
        """[(text, scored)] whose concatenation is the rendered conversation.

        Args:
          record: the record (its `messages`).
          last_only: only the last assistant message is scored (`data.score_turns=last`).

        Raises:
          DataError: a rendering is not a textual prefix of the next (the template rewrites
            earlier turns), or an assistant message renders to nothing.
        """
        messages = record.messages
        turns = [k for k, (role, _) in enumerate(messages) if role == "assistant"]
        if turns and turns[0] == 0:
            raise DataError(
                f"record {record.id!r}: the conversation starts with an assistant turn; it needs a user turn first."
            )
        segments: Segments = []
        done = ""  # the rendering so far
        try:
            for k in turns:
                before = self.render(messages[:k], generation=True)
                after = self.render(messages[: k + 1])
                self._check_prefix(record, done, before, k, "the generation prompt")
                self._check_prefix(record, before, after, k, "assistant message")
                if len(after) == len(before):
                    raise DataError(f"record {record.id!r}: message {k} renders to no text under {self.name}.")
                segments += [(before[len(done) :], False), (after[len(before) :], not last_only or k == turns[-1])]
                done = after
            whole = self.render(messages)
        except DataError:
            raise
        except Exception as e:  # jinja2 errors, raise_exception() in the template
            raise DataError(f"record {record.id!r}: {self.name} failed to render it: {e}") from None
        self._check_prefix(record, done, whole, len(messages) - 1, "the whole conversation")
        segments.append((whole[len(done) :], False))
        return [(text, scored) for text, scored in segments if text]

    def _check_prefix(self, record: Record, shorter: str, longer: str, turn: int, what: str) -> None:
        if not longer.startswith(shorter):
            at = next((i for i, (a, b) in enumerate(zip(shorter, longer, strict=False)) if a != b), len(longer))
            raise DataError(
                f"record {record.id!r}: under {self.name}, rendering up to {what} at message {turn} does not "
                f"extend the rendering before it (they differ at character {at}: {shorter[at : at + 30]!r} vs "
                f"{longer[at : at + 30]!r}), so scored spans cannot be cut out exactly. Use a template whose "
                "renderings are prefixes of one another (data.template=text, or another model)."
            )

    def prompt(self, record: Record) -> str:
        """The rendering up to the first scored text."""
        texts = []
        for text, scored in self.segments(record):
            if scored:
                break
            texts.append(text)
        return "".join(texts)

    def full_text(self, record: Record) -> str:
        return "".join(text for text, _ in self.segments(record))

    def describe(self) -> list[str]:
        return ["chat", self.tokenizer.chat_template]


def template_of(data_config: Mapping[str, Any], tokenizer=None, name: str = "the model") -> Template | ChatTemplate:
    """The template a config's `data` section names (`data.template`, default "text")."""
    kind = data_config.get("template") or "text"
    if kind not in TEMPLATES:
        raise DataError(f"unknown data.template {kind!r}; choose one of: {', '.join(TEMPLATES)}.")
    if kind == "text":
        return Template.from_config(data_config)
    return ChatTemplate.of(tokenizer, name)
