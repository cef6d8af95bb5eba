"""Chat formats: how a conversation is laid out as special tokens and text.

A format turns validated messages into `Segment`s (see `base.py`); the tokenizer encodes them. Each
format renders exactly the text of the model family's published template (for Llama 3.1 / 3.2 Instruct,
whose Hugging Face template adds a dated system message, only with `date_string` set), and splits it so that the
assistant's tokens are separate from the prompt's: the ids of a prompt with `add_generation_prompt=True`
are always a prefix of the ids of the same conversation with the answer appended. (So the ids equal
those of the whole rendered text except where an answer starts with whitespace that the text's
tokenization would merge with the header's newline, e.g. a ChatML answer starting with "\n".)

- `Llama3ChatFormat`: <|begin_of_text|><|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>...
  (with `date_string`, first a system message "Cutting Knowledge Date: December 2023\\nToday Date: ...")
- `ChatMLFormat` (Qwen2.5, SmolLM2): <|im_start|>role\\ncontent<|im_end|>\\n..., optional default system prompt.
- `Llama2ChatFormat`: <s>[INST] <<SYS>>\\nsystem\\n<</SYS>>\\n\\nuser [/INST] answer </s>...
"""

from __future__ import annotations

import logging
import re
from typing import Optional, Protocol

from qattune.errors import QattuneError

from .base import Segment

logger = logging.getLogger(__name__)


class ChatFormat(Protocol):
    """Lays out a conversation as segments. `stop_tokens`: special tokens that end an assistant turn."""

    stop_tokens: tuple[str, ...]

    def segments(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[Segment]: ...


LLAMA3_KNOWLEDGE_CUTOFF = "December 2023"  # what the Llama 3.1 / 3.2 Instruct templates state
LLAMA3_TEMPLATE_DATE = "26 Jul 2024"  # their `date_string` when none is given (3.2's, when it cannot read the clock)


class Llama3ChatFormat:
    """The Llama 3 header format; message contents are stripped, as Meta's reference and template do.

    `date_string=None`: Llama 3.0's layout, which Meta's reference code and torchtune use for 3.1 and 3.2 too.
    A date (e.g. "26 Jul 2024"): the Llama 3.1 / 3.2 Instruct Hugging Face template's, which always opens
    with a system message "Cutting Knowledge Date: December 2023\\nToday Date: <date>\\n\\n" followed by
    the conversation's own first system message, if any. Train with the layout the model will be served with.
    """

    stop_tokens = ("<|eot_id|>", "<|eom_id|>")

    def __init__(self, bos: Optional[str] = "<|begin_of_text|>", date_string: Optional[str] = None):
        self.bos, self.date_string = bos, date_string

    @staticmethod
    def _header(role: str) -> list[Segment]:
        return [Segment("<|start_header_id|>", special=True), Segment(role),
                Segment("<|end_header_id|>", special=True), Segment("\n\n")]

    def segments(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[Segment]:
        out = [Segment(self.bos, special=True)] if self.bos else []
        if self.date_string is not None:
            system = ""
            if messages and messages[0]["role"] == "system":
                system, messages = messages[0]["content"], messages[1:]
            dated = f"Cutting Knowledge Date: {LLAMA3_KNOWLEDGE_CUTOFF}\nToday Date: {self.date_string}\n\n"
            out += self._header("system") + [Segment(dated + system.strip()), Segment("<|eot_id|>", special=True)]
        for message in messages:
            is_assistant = message["role"] == "assistant"
            out += self._header(message["role"])
            out += [Segment(message["content"].strip(), assistant=is_assistant),
                    Segment("<|eot_id|>", special=True, assistant=is_assistant)]
        if add_generation_prompt:
            out += self._header("assistant")
        return out


class ChatMLFormat:
    """ChatML. When `default_system_prompt` is set and the conversation does not start with a system
    message, one with that text is put first (Qwen2.5's and SmolLM2's templates do this)."""

    stop_tokens = ("<|im_end|>", "<|endoftext|>")

    def __init__(self, default_system_prompt: Optional[str] = None):
        self.default_system_prompt = default_system_prompt

    @staticmethod
    def _message(role: str, content: str, is_assistant: bool) -> list[Segment]:
        return [Segment("<|im_start|>", special=True), Segment(f"{role}\n"),
                Segment(content, assistant=is_assistant),
                Segment("<|im_end|>", special=True, assistant=is_assistant), Segment("\n")]

    def segments(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[Segment]:
        if self.default_system_prompt is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system_prompt}, *messages]
        out: list[Segment] = []
        for message in messages:
            out += self._message(message["role"], message["content"], message["role"] == "assistant")
        if add_generation_prompt:
            out += [Segment("<|im_start|>", special=True), Segment("assistant\n")]
        return out


class Llama2ChatFormat:
    """Meta's Llama 2 chat layout: each user turn opens with bos and [INST]; each answer ends with eos.

    A system message may only come first; it is folded into the first user message. There is no
    separate generation prompt: a conversation ending with a user turn already ends with "[/INST]".
    The answer segment starts with the space that follows "[/INST]" (SentencePiece's dummy prefix
    encodes it, so the ids equal those of the whole string).
    """

    def __init__(self, bos: str = "<s>", eos: str = "</s>"):
        self.bos, self.eos = bos, eos
        self.stop_tokens = (eos,)

    def segments(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[Segment]:
        system = None
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        out: list[Segment] = []
        for index, message in enumerate(messages):
            role, content = message["role"], message["content"]
            if role == "system":
                raise QattuneError(f"Llama 2 chat: a system message may only be the first message (found one at {index + 1})")
            if role == "user":
                if system is not None:  # folded in first, then the whole is stripped (Meta's code, HF's template)
                    content, system = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}", None
                out += [Segment(self.bos, special=True), Segment(f"[INST] {content.strip()} [/INST]")]
            else:
                if not out:
                    raise QattuneError("Llama 2 chat: the conversation must start with a user message "
                                       "(after an optional system message), not an assistant one")
                out += [Segment(f" {content.strip()} ", assistant=True), Segment(self.eos, special=True, assistant=True)]
        if system is not None:
            raise QattuneError("Llama 2 chat: a system message must be followed by a user message")
        return out


def llama3_template_date(template: str) -> Optional[str]:
    """The fixed `date_string` of a Llama 3.1 / 3.2 Instruct Jinja template (it states a knowledge cutoff
    and a date), or None for Llama 3.0's template. The template's clock-read date (3.2's `strftime_now`)
    is not used: a fixed date keeps training data and outputs reproducible."""
    if "Cutting Knowledge Date" not in template:
        return None
    found = re.search(r"set\s+date_string\s*=\s*[\"']([^\"']+)[\"']", template)
    return found[1] if found else LLAMA3_TEMPLATE_DATE


def chatml_default_system_prompt(template: str) -> Optional[str]:
    """The system prompt a ChatML Jinja `template` inserts when the conversation has none (or None).

    Renders the template for one user message and reads back the system message it put first.
    """
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        text = env.from_string(template).render(
            messages=[{"role": "user", "content": "qattune-probe"}], add_generation_prompt=False,
            bos_token="", eos_token="", tools=None)
    except Exception as err:  # a template qattune cannot render: use none rather than guess
        logger.warning("could not render the chat template to find its default system prompt (%s); using none", err)
        return None
    head = "<|im_start|>system\n"
    if text.startswith(head) and "<|im_end|>" in text:
        return text[len(head): text.index("<|im_end|>")]
    return None
