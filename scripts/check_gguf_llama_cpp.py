"""Serve a qattune GGUF export with llama.cpp and compare it with qattune's own decoding; prints JSON.

    npm install --prefix /tmp/nlc node-llama-cpp@3.22.1     # prebuilt llama.cpp binaries, from npm
    python scripts/check_gguf_llama_cpp.py --gguf OUT/quantized/model-q4_0.gguf --node-modules /tmp/nlc/node_modules

llama.cpp (through node-llama-cpp's prebuilt CPU build) loads the file, tokenizes the prompt with the
tokenizer the export embedded, and decodes greedily. qattune then tokenizes the same prompt from the same
file and decodes greedily, from the quantized model folder beside the GGUF (`--quantized`, default: the
GGUF's folder) and from the GGUF itself as qattune imports it. Reported: whether the prompt tokens are
equal, how many of the greedy tokens agree before the first difference, and there qattune's probability
of its own token and of llama.cpp's (llama.cpp's CPU Q4_0 matmul quantizes activations to Q8_0 blocks, so
a near-tie can resolve differently).
Node.js and the npm package are needed only by this check, not by qattune.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from _args import positive_int

INSTALL = "npm install --prefix /tmp/nlc node-llama-cpp@3.22.1"

NODE_SCRIPT = r"""
import {getLlama} from "node-llama-cpp";
const [modelPath, prompt, count] = process.argv.slice(2);
const llama = await getLlama({gpu: false, build: "never"});
const model = await llama.loadModel({modelPath});
const context = await model.createContext({contextSize: 512, threads: 2});
const sequence = context.getSequence();
const promptTokens = model.tokenize(prompt, false);
const generated = [];
for await (const token of sequence.evaluate(promptTokens, {temperature: 0})) {
    generated.push(token);
    if (generated.length >= Number(count)) break;
}
console.log(JSON.stringify({prompt_tokens: promptTokens, generated}));
"""


def llama_cpp_greedy(gguf: Path, prompt: str, count: int, node_modules: Path) -> dict:
    """llama.cpp's prompt tokens and greedy continuation, through node-llama-cpp."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "greedy.mjs"
        script.write_text(NODE_SCRIPT)
        (Path(tmp) / "node_modules").symlink_to(node_modules.resolve())
        proc = subprocess.run(["node", str(script), str(gguf), prompt, str(count)], capture_output=True, text=True,
                              timeout=600, env={**os.environ, "NODE_LLAMA_CPP_SKIP_DOWNLOAD": "true"})
    if proc.returncode != 0:
        raise SystemExit(f"node-llama-cpp failed: {node_error(proc.stderr, proc.returncode)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def node_error(stderr: str, returncode: int) -> str:
    """The line of Node.js's stderr that says what went wrong (its first `...Error: ...` line; Node.js
    ends a crash with its own version, which says nothing)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^(\w+\.)*\w*Error\b", line)]
    if errors:
        return errors[0]
    lines = [line for line in lines if not line.startswith("Node.js v")]
    return lines[-1] if lines else f"exit code {returncode}"


def check_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse missing inputs before anything runs."""
    if not args.gguf.is_file():
        parser.error(f"--gguf {args.gguf}: no such file; give the .gguf file qattune exported "
                     f"(OUT/quantized/model-q4_0.gguf)")
    with open(args.gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            parser.error(f"--gguf {args.gguf}: not a GGUF file (it does not start with 'GGUF')")
    if args.quantized is not None and not args.quantized.is_dir():
        parser.error(f"--quantized {args.quantized}: no such folder; give qattune's quantized model folder")
    if not args.node_modules.is_dir():
        parser.error(f"--node-modules {args.node_modules}: no such folder; install node-llama-cpp with "
                     f"`{INSTALL}` and pass /tmp/nlc/node_modules")
    if not (args.node_modules / "node-llama-cpp").is_dir():
        parser.error(f"--node-modules {args.node_modules}: holds no node-llama-cpp; install it with `{INSTALL}` "
                     f"and pass /tmp/nlc/node_modules")
    if shutil.which("node") is None:
        parser.error("Node.js (`node`) is not on PATH: install Node.js 20 or later to run node-llama-cpp")


def qattune_greedy(model_path: Path, prompt_tokens: list[int], reference: list[int]) -> dict:
    """qattune's greedy continuation, how many tokens agree with `reference`, and at the first
    difference qattune's probabilities of its own token and of the reference's (a near-tie or not)."""
    import torch

    from qattune.checkpoint.auto import load_model
    from qattune.generation import generate

    model = load_model(model_path, keep_dequantized=True).eval()
    tokens = [int(t) for t in generate(model, [prompt_tokens], len(reference)).tokens[0]]
    agree = agreeing_prefix(tokens, reference)
    result = {"tokens": tokens, "agreeing_prefix": agree}
    if agree < min(len(tokens), len(reference)):
        with torch.no_grad():
            logits = model(torch.tensor([prompt_tokens + reference[:agree]]))
        probs = logits[0, -1].float().softmax(-1)
        result["at_first_difference"] = {"p_qattune_token": round(float(probs[tokens[agree]]), 4),
                                         "p_llama_cpp_token": round(float(probs[reference[agree]]), 4)}
    return result


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return min(len(a), len(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--quantized", type=Path, default=None, help="qattune's quantized folder (default: the GGUF's)")
    parser.add_argument("--node-modules", type=Path, required=True)
    parser.add_argument("--prompt", default="The `for` statement in Python is used to")
    parser.add_argument("--tokens", type=positive_int, default=48, help="greedy tokens to compare")
    args = parser.parse_args()
    check_paths(parser, args)
    from qattune.tokenizers import gguf_tokenizer

    reference = llama_cpp_greedy(args.gguf, args.prompt, args.tokens, args.node_modules)
    tokenizer = gguf_tokenizer(str(args.gguf))
    ours = tokenizer.encode(args.prompt, add_bos=False, add_eos=False)
    prompt_tokens = reference["prompt_tokens"]
    report = {
        "gguf": str(args.gguf),
        "prompt": args.prompt,
        "prompt_tokens": prompt_tokens,
        "prompt_tokens_equal": ours == prompt_tokens,
        "llama_cpp": {"tokens": reference["generated"], "text": tokenizer.decode(reference["generated"])},
    }
    for name, path in (("qattune_quantized", args.quantized or args.gguf.parent), ("qattune_gguf_import", args.gguf)):
        result = qattune_greedy(path, prompt_tokens, reference["generated"])
        report[name] = {"text": tokenizer.decode(result["tokens"]), **result}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
