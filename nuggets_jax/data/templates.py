"""Templates: how a record becomes text, and which of it is scored."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from nuggets_jax.data.records import Record


@dataclasses.dataclass(frozen=True)
class Template:
    """Prompt templates with `{instruction}` / `{input}`; the response is the stripped output."""

    prompt_no_input: str = "Instruction:\n{instruction}\nResponse:\n"
    prompt_with_input: str = "Instruction:\n{instruction}\nInput:\n{input}\nResponse:\n"

    @classmethod
    def from_config(cls, data_config: Mapping[str, Any]) -> Template:
        """The template of a config's `data` section (`prompt_no_input`, `prompt_with_input`)."""
        return cls(data_config["prompt_no_input"], data_config["prompt_with_input"])

    def prompt(self, record: Record) -> str:
        if record.input:
            return self.prompt_with_input.format(instruction=record.instruction, input=record.input)
        return self.prompt_no_input.format(instruction=record.instruction)

    def full_text(self, record: Record) -> str:
        return self.prompt(record) + record.output
