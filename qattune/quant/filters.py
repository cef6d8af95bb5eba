"""Which modules a quantizer touches: module-name regex filters and output-head detection."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

from qattune.errors import QattuneError

DEFAULT_OUTPUT_HEAD_PATTERN = r"(^|\.)(output|lm_head)$"


def _compile_all(patterns: Optional[Sequence[str]], option: str) -> list[re.Pattern]:
    compiled = []
    for pattern in patterns or ():
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise QattuneError(
                f"quantizer option {option}: {pattern!r} is not a valid regular expression ({err}); "
                "fix the pattern (module names look like 'layers.0.attn.q_proj')"
            ) from None
    return compiled


@dataclass
class ModuleNameFilter:
    """Decides from a module's qualified name whether it may be quantized.

    `include`: if given, a module must match at least one pattern (`re.search`).
    `exclude`: a module matching any pattern is kept in float.
    """

    include: Optional[Sequence[str]] = None
    exclude: Optional[Sequence[str]] = None
    _include: list[re.Pattern] = field(init=False, repr=False)
    _exclude: list[re.Pattern] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._include = _compile_all(self.include, "include")
        self._exclude = _compile_all(self.exclude, "exclude")

    def skip_reason(self, name: str) -> Optional[str]:
        """None if `name` passes the filter, else why it is skipped."""
        if self._include and not any(p.search(name) for p in self._include):
            return "not matched by include"
        for pattern in self._exclude:
            if pattern.search(name):
                return f"matched exclude '{pattern.pattern}'"
        return None


def is_output_head(name: str, pattern: str = DEFAULT_OUTPUT_HEAD_PATTERN) -> bool:
    """True if the Linear called `name` is the model's output head, or the layer a wrapper around the
    head holds (e.g. LoRA's `output.base`): its name or its parent's name matches `pattern`."""
    parent = name.rpartition(".")[0]
    return re.search(pattern, name) is not None or (parent != "" and re.search(pattern, parent) is not None)
