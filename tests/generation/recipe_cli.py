"""The eval and generate recipes through the real CLI, on tiny checkpoints written in a blink."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from qattune.checkpoint import write_hf_checkpoint
from qattune.models import Transformer, get_adapter, llama
from qattune.quant import PTQQuantizer, save_quantized

BYTES = "tokenizer={_component_: qattune.tokenizers.byte_tokenizer}"  # vocab 260


def write_checkpoint(directory: Path, vocab_size: int = 260, seed: int = 0, scheme: Optional[str] = None,
                     **options) -> Transformer:
    """A 2-layer width-64 Llama (max_seq_len 256, seeded random weights) as a Hugging Face folder, or with
    `scheme` (and quantizer `options`) as a PTQ `quantize` output; the model written (converted, for a scheme)."""
    torch.manual_seed(seed)
    model = llama(vocab_size, 2, 4, 2, 64, 192, 256).eval()
    adapter = get_adapter("llama")
    if scheme is None:
        directory.mkdir(parents=True)
        write_hf_checkpoint(model.state_dict(), model.config, adapter, directory, 1 << 30)
        return model
    PTQQuantizer(scheme, **options).convert(model)
    save_quantized(model, directory, hf_config=adapter.config_to_hf(model.config, torch.float32))
    return model


def run_recipe(*args: str, returncode: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "qattune.cli.main", "run", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == returncode, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def error_line(*args: str) -> str:
    """The one line a refused run prints (exit code 2, no traceback), without its `error: ` prefix."""
    proc = run_recipe(*args, returncode=2)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Skipping import of cpp extensions" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0].removeprefix("error: ")
