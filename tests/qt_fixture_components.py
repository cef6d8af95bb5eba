"""Components used by the config tests (imported by dotted path, like any `_component_`)."""

from dataclasses import dataclass
from typing import Literal, Optional

from qt_fixture_reexport import reexported_builder  # noqa: F401  (re-exported on purpose)

CALLS = []


class Point:
    def __init__(self, x: int, y: int = 0):
        self.x, self.y = x, y


class Point3(Point):
    pass


@dataclass
class Settings:
    name: str
    scale: float = 1.0
    mode: Literal["fast", "exact"] = "fast"


def make_pair(first, second: Optional[Point] = None, *, label: str = "pair"):
    CALLS.append(label)
    return (first, second, label)


def scaled(values: list[float], factor: float = 2.0) -> list[float]:
    return [v * factor for v in values]


def flexible(a: int, **rest):
    return a, rest
