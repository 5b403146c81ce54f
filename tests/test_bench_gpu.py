"""bench/gpu.py and bench/gpu.sh keep working without a GPU: their smoke mode runs every part on the CPU.

A GPU session has a few minutes of device time and no second try, so a broken benchmark must show
up here first. The CUDA test is the one bench/gpu.sh runs on the device before the full benchmark.
"""

import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from bench import gpu
from bench.common import build_on_device
from bench.decode_kernel_launches import SMOKE_GRID

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu") / "gpu.json"
    threads = torch.get_num_threads()
    try:
        assert gpu.main(["--smoke", "--json", str(path)]) == 0
    finally:
        torch.set_num_threads(threads)  # --smoke runs on one thread; the tests after it keep theirs
    return json.loads(path.read_text())


def test_smoke_run_reports_every_part(smoke_results):
    assert list(smoke_results["parts"]) == list(gpu.PARTS)
    for name, part in smoke_results["parts"].items():
        assert "error" not in part, name
        assert part["wall_s"] > 0
    settings = smoke_results["settings"]
    assert settings["preset"] == "tiny" and settings["device"] == "cpu"
    assert smoke_results["environment"]["torch"] == torch.__version__


def test_smoke_throughputs_count_every_requested_token(smoke_results):
    parts, settings = smoke_results["parts"], smoke_results["settings"]
    wanted = settings["requests"] * settings["output_len"]
    runs = [parts["hf-static"], parts["hf-cb"], parts["hf-cb"]["first_call"]]
    engines = [name for name in gpu.ENGINE_PARTS if name.startswith("engine")]
    assert len(engines) == len(gpu.VARIANTS)
    runs += [parts[engine][run] for engine in engines for run in ("base", "adapters")]
    for run in runs:
        assert run["tokens"] == wanted and run["tokens_per_s"] > 0
    assert parts["hf-cb"]["settings"]["max_requests_per_batch"] == settings["max_num_seqs"]
    for run in (parts[engine][run] for engine in engines for run in ("base", "adapters")):
        assert 0 <= run["outside_steps_s"] < run["seconds"]
        prefill, decode = run["steps"]["prefill"], run["steps"]["decode"]
        assert prefill["count"] > 0 and decode["count"] > 0
        assert all(
            0 < steps["median_ms"] <= steps["max_ms"] and 0 <= steps["device_wait_share"] <= 1
            for steps in (prefill, decode)
        )
        for steps in (prefill, decode):  # the phases split the mean step
            assert math.isclose(sum(steps["phase_mean_ms"].values()), steps["mean_ms"], rel_tol=1e-6)
            assert 0 < steps["cpu_mean_ms"] <= steps["mean_ms"]


# on the CPU the default ("decode") is synchronous, as "decode-sync"
DECODE_PARTS = [("decode", "sdpa", True), ("decode-sync", "sdpa", True), ("decode-eager", "sdpa", False)]
DECODE_PARTS += [("decode-sdpa", "sdpa", False)]
DECODE_PARTS += [("decode-compile", "sdpa", True)]
DECODE_PARTS += [("decode-flex", "flex", False)]  # on the CPU, auto is sdpa
DECODE_PARTS += [("decode-async", "sdpa", True), ("decode-compile-async", "sdpa", True)]


@pytest.mark.parametrize("part, backend, graphs", DECODE_PARTS)
def test_smoke_decode_steps_sit_above_their_memory_floor(smoke_results, part, backend, graphs):
    decode = smoke_results["parts"][part]
    assert (decode["attention_backend"], decode["cuda_graphs"]) == (backend, graphs)
    assert decode["async_scheduling"] == part.endswith("-async")
    assert decode["bandwidth"]["gb_per_s"] > 0
    assert [step["seqs"] for step in decode["steps"]] == list(smoke_results["settings"]["decode_seqs"])
    for step in decode["steps"]:
        assert step["mean_context"] >= smoke_results["settings"]["decode_context"]
        assert 0 < step["floor_ms"] < step["step_ms"]
        # the forward is timed alone, synchronized: with async scheduling it may take longer than a step
        assert step["forward_ms"] > 0 and step["attention_ms"] > 0
        assert step["async_scheduling"] == part.endswith("-async")


def test_smoke_parity_is_exact_in_float32(smoke_results):
    parity = smoke_results["parts"]["parity"]
    exact = parity["float32"]
    assert exact["cases"] == 2
    for key in ("engine_vs_pyreft", "reference_vs_pyreft", "engine_vs_reference"):
        assert exact[f"adapter_{key}"] == exact[f"base_{key}"] == 2, key
    assert set(parity["bfloat16"]) == set(exact)
    forced = parity["bfloat16_forced"]["sdpa"]  # on the CPU the default backend is sdpa itself
    assert forced["positions"] > 0 and 0 < forced["mean_abs_error"] < 0.1


def test_the_1b_preset_has_llama_3_2_1b_shape():
    model = build_on_device("1b", "meta", torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 1_235_814_400  # Llama-3.2-1B's count
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (32, 8, 64)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_unknown_parts_are_refused(capsys):
    with pytest.raises(SystemExit):
        gpu.parse_args(["--parts", "engine,warp-drive"])
    assert "unknown parts warp-drive" in capsys.readouterr().err


def test_gpu_sh_writes_everything_under_out(tmp_path):
    environment = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    command = ["bash", str(ROOT / "bench" / "gpu.sh"), "--smoke", "--parts", "hf-static", "--requests", "2"]
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert list(results["parts"]) == ["hf-static"] and "error" not in results["parts"]["hf-static"]
    assert "[hf-static]" in (tmp_path / "gpu.log").read_text()


def test_gpu_sh_bundles_everything_into_one_archive(tmp_path):
    """GPU_BUNDLE=1: the device tool brings back a few files only, so the results travel as one archive."""
    environment = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "GPU_BUNDLE": "1"}
    command = ["bash", str(ROOT / "bench" / "gpu.sh"), "--smoke", "--parts", "hf-static", "--requests", "2"]
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [path.name for path in tmp_path.iterdir()] == ["gpu-results.tgz"]
    with tarfile.open(tmp_path / "gpu-results.tgz") as archive:
        assert {"./gpu.json", "./gpu.log"} <= set(archive.getnames())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_smoke_run_on_cuda(tmp_path):
    path = tmp_path / "gpu.json"
    assert gpu.main(["--smoke", "--device", "cuda", "--json", str(path)]) == 0
    results = json.loads(path.read_text())
    assert results["settings"]["dtype"] == "bfloat16"
    assert all(part["peak_memory_gib"] > 0 for part in results["parts"].values())
    launches = results["parts"]["kernel"]["launches"]  # every launch of the grid gives the default's attention
    assert len(launches) == math.prod(map(len, SMOKE_GRID.values()))
    assert all(launch["max_difference"] < 1.6e-2 for launch in launches)
    assert "varlen" in results["parts"]["kernel"]  # its timing, or why this torch cannot run it
    assert all(case["max_difference"] < 1.6e-2 for case in results["parts"]["kernel"]["prefill"].values())


def test_smoke_kernel_part_times_the_twins_alone_on_a_cpu(smoke_results):
    kernel = smoke_results["parts"]["kernel"]
    assert kernel["seqs"] == max(smoke_results["settings"]["decode_seqs"])
    assert kernel["kv_bytes"] > 0 and kernel["default"]["ms"] > 0 and kernel["launches"] == []
    for sweep, (seqs, context) in zip(kernel["sweeps"], smoke_results["settings"]["kernel_shapes"], strict=True):
        assert sweep["seqs"] == seqs and sweep["mean_context"] >= context and sweep["default"]["ms"] > 0
    settings = smoke_results["settings"]
    prefill = kernel["prefill"]
    assert [case["cached"] for case in prefill.values()] == [0, max(settings["prompt_len"]), 0]
    assert prefill["new"]["chunks"] >= 2 and prefill["one_long"]["chunks"] == 1
    for case in prefill.values():  # one step's budget of chunks, both paths timed, the same attention
        assert case["tokens"] == settings["max_batched_tokens"]
        assert case["paged_ms"] > 0 and case["sdpa_ms"] > 0 and case["max_difference"] < 1e-5


def test_smoke_profile_names_where_host_time_goes(smoke_results):
    profiled = smoke_results["parts"]["profile"]
    assert profiled["seqs"] == max(smoke_results["settings"]["decode_seqs"])
    with_prefill = ("prefill", "prefill_adapters", "mixed", "mixed_adapters")
    for phase in ("decode", *with_prefill):
        assert profiled[phase]["device"] == []  # the CPU has no device timeline
        assert any(op["name"] == "aten::mm" and op["ms"] > 0 for op in profiled[phase]["host"])
    for phase in with_prefill:  # a full budget of new prompts (beside decoding rows: mixed), launched then finished
        assert profiled[phase]["prompts"] >= 2 and 0 < profiled[phase]["launch_ms"] <= profiled[phase]["done_ms"]
    assert profiled["mixed"]["decoding"] == profiled["mixed_adapters"]["decoding"] >= 1
