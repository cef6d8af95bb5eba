"""Argument checks shared by the scripts in this folder (`import _args`: a script's own folder is on
`sys.path` when it runs as `python scripts/NAME.py`).

A bad value is one line from `parser.error` (exit code 2) before any heavy work, never a traceback:
the `type=` helpers below through argparse, the `check_*` functions after `parse_args()`.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Iterable, Optional


def positive_int(text: str) -> int:
    """argparse `type=`: an integer >= 1."""
    return at_least(1)(text)


def non_negative_int(text: str) -> int:
    """argparse `type=`: an integer >= 0."""
    return at_least(0)(text)


def at_least(minimum: int, why: str = ""):
    """argparse `type=`: an integer >= `minimum` (`why` explains the bound in the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            kind = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
            raise argparse.ArgumentTypeError(f"must be {kind}{why}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its own messages
    return parse


def check_cuda(parser: argparse.ArgumentParser, option: str, devices: Iterable[str]) -> None:
    """Refuse `cuda` among `devices` when torch sees no CUDA device."""
    if "cuda" not in devices:
        return
    import torch

    if not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        parser.error(f"{option} cuda: CUDA is not available on this machine ({why}, torch {torch.__version__}); "
                     f"use {option} cpu")


def check_writable_file(parser: argparse.ArgumentParser, option: str, path: Optional[str]) -> None:
    """Refuse an output file whose folder is missing or not writable, or that names a folder."""
    if path is None:
        return
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        parser.error(f"{option} {path}: is a folder; give a file name, e.g. {target / 'result.json'}")
    if not folder.is_dir():
        parser.error(f"{option} {path}: folder {folder} does not exist; create it first or write elsewhere")
    if not os.access(folder, os.W_OK):
        parser.error(f"{option} {path}: folder {folder} is not writable; write elsewhere")


def scheme_block_size(scheme: str, group_size: Optional[int] = None, quantize_embedding: bool = False) -> int:
    """The input width `scheme` needs a multiple of in a Linear layer: the least common multiple of its
    weights' and activations' group/block sizes (with `quantize_embedding`, its embeddings' too); 1 when
    it quantizes per row."""
    from qattune.quant.schemes import resolve_scheme_config

    config = resolve_scheme_config(scheme, group_size=group_size, quantize_embedding=quantize_embedding)
    formats = [config.weight_format("Linear", is_output=False), config.activation_format()]
    if config.quantize_embedding:
        formats.append(config.weight_format("Embedding", is_output=False))
    return math.lcm(1, *(fmt.block_size for fmt in formats if getattr(fmt, "block_size", None)))


def check_widths(parser: argparse.ArgumentParser, widths: dict[str, int], blocks: dict[str, int],
                 schemes_option: str = "--schemes") -> None:
    """Refuse any width (`{"--embed-dim": 60}`) that a scheme's block size (`{"8da4w": 32}`, from
    `scheme_block_size`) does not divide."""
    for option, width in widths.items():
        misfits = {scheme: block for scheme, block in blocks.items() if width % block}
        if misfits:
            needs = ", ".join(f"{scheme}: {block}" for scheme, block in misfits.items())
            multiple = math.lcm(*blocks.values())
            parser.error(f"{option} {width}: must be a multiple of each scheme's group/block size ({needs}); "
                         f"use a multiple of {multiple}, or leave those schemes out of {schemes_option}")
