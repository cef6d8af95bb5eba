"""The benchmark and check scripts refuse bad arguments with one error line and exit code 2, before any
heavy work and without a traceback; the bench scripts' stdout is their JSON report alone."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def _error(script: str, *args: str, cwd: Path) -> str:
    """The error line of a refused command line (after argparse's usage lines), checked to be the only
    problem reported: exit code 2, no traceback, nothing on stdout."""
    proc = _run(script, *args, cwd=cwd)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("script, args, line", [
    ("bench_cli.py", ["--runs", "0"], "argument --runs: must be a positive integer, got 0"),
    ("bench_fake_quant.py", ["--shape", "100", "64", "16", "--schemes", "8da4w", "4w", "8w"],
     "--shape IN 100: must be a multiple of each scheme's group/block size (8da4w: 32, 4w: 128); use a multiple "
     "of 128, or leave those schemes out of --schemes"),
    ("bench_train.py", ["--embed-dim", "60"],
     "--embed-dim 60: must be a multiple of --num-heads 8 (each head gets embed_dim / num_heads channels)"),
    ("bench_train.py", ["--dtype", "float64x"],
     "argument --dtype: invalid choice: 'float64x' (choose from 'float32', 'bfloat16', 'float16')"),
    ("bench_generate.py", ["--schemes", "8da4w:abc"],
     "--schemes 8da4w:abc: the group size after ':' must be a positive integer (e.g. 4w:64), got 'abc'"),
    ("bench_generate.py", ["--new-tokens", "1"],
     "argument --new-tokens: must be an integer >= 2 (decode tokens/s counts the tokens after the first), got 1"),
    ("bench_quality.py", ["--steps", "0"], "argument --steps: must be a positive integer, got 0"),
], ids=["cli-runs", "fake_quant-shape", "train-embed_dim", "train-dtype", "generate-group", "generate-tokens",
        "quality-steps"])
def test_bad_arguments_are_one_line(tmp_path, script, args, line):
    assert _error(script, *args, cwd=tmp_path) == f"{script}: error: {line}"


def test_bench_fake_quant_says_cuda_is_not_available(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = _error("bench_fake_quant.py", "--devices", "cuda", cwd=tmp_path)
    assert line.startswith("bench_fake_quant.py: error: --devices cuda: CUDA is not available on this machine (")
    assert line.endswith("; use --devices cpu")


def test_profile_train_step_lists_the_variants(tmp_path):
    line = _error("profile_train_step.py", "--variants", "bogus", cwd=tmp_path)
    assert line.startswith("profile_train_step.py: error: argument --variants: invalid choice: 'bogus' "
                           "(choose from 'plain', 'qat/8da4w', ")
    assert "'qat_lora/8da4w'" in line


def test_bench_generate_checks_the_out_folder_before_running(tmp_path):
    out = tmp_path / "missing" / "x.json"
    assert _error("bench_generate.py", "--out", str(out), cwd=tmp_path) == (
        f"bench_generate.py: error: --out {out}: folder {out.parent} does not exist; "
        "create it first or write elsewhere")


def test_bench_generate_prints_its_json_on_stdout(tmp_path):
    out = tmp_path / "report.json"
    proc = _run("bench_generate.py", "--model", "tiny", "--schemes", "8w", "--batch-sizes", "1", "--new-tokens",
                "2", "--prompt-len", "4", "--repeats", "1", "--threads", "1", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [row["variant"] for row in report["devices"][0]["results"]] == ["float", "8w"]
    assert json.loads(out.read_text()) == report
    assert "decode tok/s" in proc.stderr  # the table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # nothing written to the working folder


def test_check_gguf_llama_cpp_checks_its_paths(tmp_path):
    gguf = tmp_path / "model.gguf"
    assert _error("check_gguf_llama_cpp.py", "--gguf", str(gguf), "--node-modules", str(tmp_path),
                  cwd=tmp_path) == (
        f"check_gguf_llama_cpp.py: error: --gguf {gguf}: no such file; give the .gguf file qattune exported "
        "(OUT/quantized/model-q4_0.gguf)")
    gguf.write_bytes(b"GGUF" + bytes(8))
    assert _error("check_gguf_llama_cpp.py", "--gguf", str(gguf), "--node-modules", str(tmp_path / "nowhere"),
                  cwd=tmp_path) == (
        f"check_gguf_llama_cpp.py: error: --node-modules {tmp_path / 'nowhere'}: no such folder; install "
        "node-llama-cpp with `npm install --prefix /tmp/nlc node-llama-cpp@3.22.1` and pass /tmp/nlc/node_modules")


def test_bench_quality_sends_the_recipes_output_to_stderr(monkeypatch, capsys, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_quality", SCRIPTS / "bench_quality.py")
    bench_quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_quality)

    def run_seed(root, seed, args, minutes):
        print("step 1 | loss=2.0")  # as the recipes' metric logger and eval tables print
        return {}

    monkeypatch.setattr(bench_quality, "_run_seed", run_seed)
    monkeypatch.setattr("sys.argv", ["bench_quality.py", "--output-dir", str(tmp_path)])
    bench_quality.main()
    captured = capsys.readouterr()
    assert json.loads(captured.out)["benchmark"] == "quality"
    assert "step 1 | loss=2.0" in captured.err
