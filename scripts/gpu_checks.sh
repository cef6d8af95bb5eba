#!/usr/bin/env bash
# The GPU checks in one go: the CUDA tests, then the decode and training benchmarks on Llama-3.2-1B-sized
# random weights. Usage: bash scripts/gpu_checks.sh OUT_DIR [PART ...], PART one of tests, generate,
# generate_compile, profile, train, train_compile (default: tests generate generate_compile train).
# JSON and logs land in OUT_DIR; each part has its own time limit. Figures: docs/benchmarks.md.
set -u
out=${1:?usage: gpu_checks.sh OUT_DIR [PART ...]}; shift
parts=${*:-tests generate generate_compile train}
for part in $parts; do
  case $part in
    tests|generate|generate_compile|profile|train|train_compile) ;;
    *) echo "unknown part '$part': use tests, generate, generate_compile, profile, train or train_compile"; exit 2 ;;
  esac
done
python=${PYTHON:-python3}
if ! $python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "no CUDA GPU visible to $python: these checks need one"; exit 2
fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
for part in $parts; do
  echo "== $part"
  case $part in
    tests)
      timeout 480 $python -m pytest -p no:warnings -p no:logging -q -rs --tb=line tests/quant/test_convert_kernels.py \
        tests/generation/test_generation_decode.py tests/quant/test_fake_quant_cuda.py \
        tests/quant/test_formats_float.py::test_divide_by_is_exact_in_compiled_cuda_code 2>&1 | tee "$out/tests.log" ;;
    generate)  # every scheme, the decode step replayed from a CUDA graph
      timeout 200 $python scripts/bench_generate.py --devices cuda --model llama3.2-1b --new-tokens 64 --cuda-graph \
        --schemes 4w 4w:64 8w 8da8w fp8 8da4w q4_0 --out "$out/generate_graph.json" 2>&1 >/dev/null | grep -v '^{' ;;
    generate_compile)  # compiled (fused) and replayed: the weight-read-bound figure
      timeout 300 $python scripts/bench_generate.py --devices cuda --model llama3.2-1b --new-tokens 64 --compile \
        --cuda-graph --schemes 4w 4w:64 --out "$out/generate_compile_graph.json" 2>&1 >/dev/null | grep -v '^{' ;;
    profile)
      for sort in device cpu; do
        timeout 200 $python scripts/profile_train_step.py --device cuda --variants plain qat/8da4w qat/4w --sort $sort \
          --rows 40 --out "$out" > "$out/profile_$sort.log" 2>&1; done
      tail -c 1200 "$out/profile_device.log" ;;
    train)
      timeout 330 $python scripts/bench_train.py --device cuda --rounds 3 --steps 3 --warmup 2 \
        --schemes 8da4w 4w 8da8w fp8 nvfp4 q4_0 --out "$out/train.json" > "$out/train.log" 2>&1
      tail -c 6000 "$out/train.log" ;;
    train_compile)  # not on torch 2.11: compile_blocks refuses fake-quantized blocks there (pytorch#180642)
      timeout 420 $python scripts/bench_train.py --device cuda --modes compile --rounds 2 --steps 3 --warmup 2 \
        --variants plain qat/8da4w qat/4w torchao/8da4w --out "$out/train_compile.json" > "$out/train_compile.log" 2>&1
      tail -c 6000 "$out/train_compile.log" ;;
  esac
done
