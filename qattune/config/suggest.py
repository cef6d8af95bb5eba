"""'Did you mean ...' suggestions for misspelt names."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Up to `n` candidates close to `name`, best first."""
    pool = sorted(set(candidates))
    prefix, dot, leaf = name.rpartition(".")
    siblings = [c[len(prefix) + 1 :] for c in pool if dot and c.startswith(prefix + ".")]
    if siblings:  # dotted names: compare the last part among names under the same prefix
        return [f"{prefix}.{m}" for m in difflib.get_close_matches(leaf, siblings, n=n, cutoff=0.6)]
    matches = difflib.get_close_matches(name, pool, n=n, cutoff=0.6)
    if not matches:
        lowered = {c.lower(): c for c in pool}
        matches = [lowered[m] for m in difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.6)]
    return matches


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """' Did you mean X?' (leading space) or '' when nothing is close."""
    matches = closest(name, candidates)
    if not matches:
        return ""
    return " Did you mean " + " or ".join(f"'{m}'" for m in matches) + "?"
