#!/usr/bin/env bash
# One GPU session's measurements in one command, everything written under $OUT:
#   1. nvidia-smi (nvidia-smi.txt) and the CUDA tests (gpu-tests.log), skipped where there is no GPU;
#   2. bench/gpu.py (gpu.log, gpu.json), given every argument except --server (skipped with --server-only,
#      which runs step 3 alone, so that a session can split its work into calls of under 10 minutes);
#   3. with --server only: `reft-server serve` on the 1b preset with 64 stored adapters, loaded by
#      bench/load.py with 128 concurrent clients after an untimed warm-up load, once per entry of
#      SERVERS (default "process process-b8192": the GPU server's engine host, with the issue's step budget
#      and with the server's own): the engine core's host, `process` (a process of its own) or `thread`,
#      with `-sync`, `-async`, `-compile`, `-bN`, `-tN` and/or `-pN` suffixes adding --no-async-scheduling
#      (async scheduling is the GPU default), --async-scheduling, --compile, --max-batched-tokens N (default
#      4096: how many prompt tokens a step takes, which sets how many steps a wave of prompts waits for),
#      --threads N (torch's CPU threads; the server's GPU default is one) and --step-token-multiple N (eager
#      steps padded to a multiple of N tokens) (server-KIND.log, load-KIND.json, metrics-KIND.txt for each
#      KIND, e.g. process-async), then 40 steps of a further load profiled through
#      POST /v1/admin/profile (profile-KIND.txt), then 20 steps of another with Python's frames
#      (profile-KIND-stacks.txt: the engine thread's Python time, the host's waits for the device).
# Steps 1-2 need torch and transformers only (and llguidance for the structured-output test). Step 3 also
# needs the HTTP stack, which GPU machines without network access lack: carry these as py3.12 wheels
# and install them first: llguidance, fastapi,
# starlette, pydantic, pydantic-core, pydantic-settings, python-dotenv, annotated-types,
# typing-inspection, uvicorn, python-multipart, opentelemetry-api, and uvloop and httptools, which
# uvicorn[standard] (the package's dependency, as in the Docker image) brings: without them uvicorn
# falls back to asyncio's own loop and a pure-Python HTTP parser, and the figures understate a real
# deployment (and httpx, prometheus-client, safetensors, tokenizers where missing). bench/gpu_wheels.sh
# downloads the listed ones into .whl/. The server reads its version from the package's metadata, so
# step 3 installs the package itself (no dependencies, no network) where it is not installed.
#
#   bench/gpu.sh                                  # as the device tool's command ($OUT is set there);
#                                                 # engine,decode,hf-static,parity + --server: ~4 min, H200
#   OUT=/tmp/gpu bench/gpu.sh                     # elsewhere
#   OUT=/tmp/gpu bench/gpu.sh --parts decode      # any bench/gpu.py flags
#   OUT=/tmp/gpu bench/gpu.sh --smoke             # seconds, on any machine
#   GPU_BUNDLE=1 bench/gpu.sh --server-only       # everything in $OUT/gpu-results.tgz
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# the CUDA tests (skipped without CUDA); GPU_TESTS="..." runs others, GPU_TESTS=" " none
read -ra GPU_TESTS <<<"${GPU_TESTS:-tests/test_gpu_engine.py tests/test_bench_gpu.py::test_smoke_run_on_cuda}"
read -ra SERVERS <<<"${SERVERS:-process process-b8192}"

server=0 bench=1
bench_args=()
for arg in "$@"; do
  case $arg in
    --server) server=1 ;;
    --server-only) server=1 bench=0 ;;
    *) bench_args+=("$arg") ;;
  esac
done
failed=0

if ! nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1; then
  rm -f "$OUT/nvidia-smi.txt"
  echo "no NVIDIA GPU here: the GPU tests are skipped"
elif [ "${#GPU_TESTS[@]}" -gt 0 ]; then
  "$PYTHON" -m pytest -q -p no:cacheprovider "${GPU_TESTS[@]}" 2>&1 | tee "$OUT/gpu-tests.log" || failed=1
fi

if [ "$bench" = 1 ]; then
  "$PYTHON" bench/gpu.py --json "$OUT/gpu.json" "${bench_args[@]}" 2>&1 | tee "$OUT/gpu.log" || failed=1
fi

serve_and_load() {
  local model=${TMPDIR:-/tmp}/reft-gpu-model store=${TMPDIR:-/tmp}/reft-gpu-store
  "$PYTHON" -c 'import fastapi, uvicorn, pydantic_settings, multipart' || {
    echo "--server needs the HTTP stack's wheels (see the top of bench/gpu.sh)"
    return 1
  }
  "$PYTHON" -c 'import uvloop, httptools' 2>/dev/null ||
    echo "warning: no uvloop/httptools here: uvicorn runs on asyncio's loop and h11 (see the top of bench/gpu.sh)"
  "$PYTHON" -c 'import importlib.metadata as m; m.version("reft-server")' 2>/dev/null ||
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . || return 1
  "$PYTHON" - "$model" "$store" <<'PY' || return 1
import sys
from pathlib import Path

import torch

from bench.common import save_preset_model
from server.adapters.store import AdapterStore
from server.adapters.random_adapters import random_adapter_file

model, store = Path(sys.argv[1]), AdapterStore(sys.argv[2])
save_preset_model("1b", model, "cuda", torch.bfloat16)
layers = tuple(range(0, 16, 2))
for i in range(64):
    adapter = random_adapter_file("loreft", layers, 4, "f7+l7", 2048, seed=i, scale=0.05)
    store.publish(f"a{i}", adapter.to_bytes())
PY
  local kind status=0
  for kind in "${SERVERS[@]}"; do
    load_one "$model" "$store" "$kind" || status=1
  done
  return $status
}

# one server of a SERVERS entry (process or thread, then -sync, -async, -compile): an untimed warm-up load, then the measured one
load_one() {
  local model=$1 store=$2 kind=$3 port=8431 adapters option options flags=() budget=4096
  IFS=- read -ra options <<<"$kind"
  flags+=(--engine-core "${options[0]}")
  for option in "${options[@]:1}"; do
    case $option in
      async) flags+=(--async-scheduling) ;;
      sync) flags+=(--no-async-scheduling) ;;
      compile) flags+=(--compile) ;;
      b[0-9]*) budget=${option#b} ;;
      t[0-9]*) flags+=(--threads "${option#t}") ;;
      p[0-9]*) flags+=(--step-token-multiple "${option#p}") ;;
      *) echo "unknown server option $option in $kind"; return 1 ;;
    esac
  done
  "$PYTHON" -c 'import sys; from server.cli import main; sys.exit(main())' serve --model "$model" --device cuda \
    --dtype bfloat16 --kv-cache-memory 16GiB --max-num-seqs 128 --max-batched-tokens "$budget" --store "$store" \
    "${flags[@]}" --admin-open --profile-dir "$OUT/profiles-$kind" --port "$port" --log-level warning \
    >"$OUT/server-$kind.log" 2>&1 &
  local pid=$! ready=0
  for _ in $(seq 300); do  # --compile compiles and captures before the server is ready
    "$PYTHON" -c "import httpx, sys; sys.exit(httpx.get('http://127.0.0.1:$port/ready').status_code != 200)" \
      2>/dev/null && { ready=1; break; }
    kill -0 "$pid" 2>/dev/null || { echo "the server exited (see server-$kind.log)"; return 1; }
    sleep 1
  done
  [ "$ready" = 1 ] || { echo "the server was not ready in time (see server-$kind.log)"; kill "$pid"; return 1; }
  adapters=$("$PYTHON" -c "print(','.join(f'a{i}' for i in range(64)))")
  local load=("$PYTHON" bench/load.py --url "http://127.0.0.1:$port" --concurrency 128 --prompt-len 128 512
    --output-len 128 128 --adapters "$adapters" --zipf 1.1 --base-share 0.1 --deadline 90)
  "${load[@]}" --requests 128 --seed 1 --out "$OUT/load-warm-up-$kind.json" >/dev/null
  "${load[@]}" --requests 512 --out "$OUT/load-$kind.json"
  local status=$?
  "$PYTHON" -c "import httpx; print(httpx.get('http://127.0.0.1:$port/metrics').text)" >"$OUT/metrics-$kind.txt"
  step_kinds "$OUT/metrics-$kind.txt"
  profile_under_load "$port" "$kind" "${load[@]}"
  kill "$pid"
  wait "$pid"
  return $status
}

# after the measured load (profiling slows the steps it covers): the engine's next 40 steps under torch.profiler
# while 128 more requests run, its summary kept as profile-KIND.txt (the timeline is too large to bring back);
# then 20 steps with Python's frames, as profile-KIND-stacks.txt
profile_under_load() {
  local port=$1 kind=$2
  shift 2
  profile_once "$port" "{'steps': 40}" "$OUT/profile-$kind.txt" "$@"
  profile_once "$port" "{'steps': 20, 'with_stack': True}" "$OUT/profile-$kind-stacks.txt" "$@"
  rm -rf "$OUT/profiles-$kind"
}

# one profile (the request's JSON body, as a Python literal) under a load of 128 requests, its summary copied to $3
profile_once() {
  local port=$1 body=$2 copy=$3 summary
  shift 3
  summary=$("$PYTHON" -c "import httpx; print(httpx.post('http://127.0.0.1:$port/v1/admin/profile', json=$body).json()['summary'])") || return 0
  "$@" --requests 128 --seed 2 --out /dev/null >/dev/null
  for _ in $(seq 90); do [ -f "$summary" ] && break; sleep 1; done  # with frames the summary takes longer
  [ -f "$summary" ] && cp "$summary" "$copy" && head -12 "$summary"
}

# how many engine steps only decoded (graph replays) and how many also prefilled (eager), their mean time in
# each phase (scheduling, launching, reading) and on the engine thread's CPU (the rest it waited for the GIL
# or a core; on CUDA the device waits spin, so they count as CPU time), and how much of their time they
# blocked for the device;
# warm-up load included
step_kinds() {
  "$PYTHON" - "$1" <<'PY'
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

steps, phases, cpu, waited = {}, {}, {}, 0.0
for family in text_string_to_metric_families(Path(sys.argv[1]).read_text()):
    if family.name == "reft_step_duration_seconds":
        for sample in family.samples:
            if sample.name.endswith(("_count", "_sum")):
                steps.setdefault(sample.labels["kind"], {})[sample.name.rsplit("_", 1)[1]] = sample.value
    elif family.name == "reft_step_phase_seconds":
        for sample in family.samples:
            if sample.name.endswith("_total"):
                phases.setdefault(sample.labels["kind"], {})[sample.labels["phase"]] = sample.value
    elif family.name == "reft_step_cpu_seconds":
        cpu.update((sample.labels["kind"], sample.value) for sample in family.samples if sample.name.endswith("_total"))
    elif family.name == "reft_step_device_wait_seconds":
        waited = sum(sample.value for sample in family.samples if sample.name.endswith("_total"))
for kind, figures in sorted(steps.items()):
    count = figures["count"] or 1
    split = ", ".join(f"{phase} {1000 * spent / count:.1f}" for phase, spent in phases.get(kind, {}).items())
    print(
        f"engine steps, {kind}: {figures['count']:.0f}, mean {1000 * figures['sum'] / count:.1f} ms ({split}), "
        f"of it on the CPU {1000 * cpu.get(kind, 0.0) / count:.1f} ms"
    )
busy = sum(figures["sum"] for figures in steps.values())
print(f"engine steps blocked for the device {100 * waited / busy if busy else 0.0:.0f}% of their time")
PY
}

if [ "$server" = 1 ]; then
  serve_and_load || failed=1
fi
# GPU_BUNDLE=1: everything under $OUT packed into one archive, gpu-results.tgz (the device tool brings back at
# most 8 files, and a call with servers writes about 7 a server)
if [ -n "${GPU_BUNDLE:-}" ]; then
  bundle=$(mktemp --suffix .tgz)
  tar -czf "$bundle" -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv "$bundle" "$OUT/gpu-results.tgz" || failed=1
fi
exit "$failed"
