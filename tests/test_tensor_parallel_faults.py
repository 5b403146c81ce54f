"""Tensor-parallel faults: what a follower lacks or a rank raises must fail promptly, never hang; a
wedged follower breaks the group within STEP_TIMEOUT; a failed start leaves no follower behind."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import tests.gated_reft_plugin  # noqa: F401  (registers gatedreft here, for the reference)
from server.adapters.format import AdapterFile
from server.adapters.materialize import materialize
from server.adapters.random_adapters import random_adapter_file
from server.config import Settings
from server.distributed.adapter_mirror import AdapterReceiver, AdapterSender
from server.distributed.group import TensorParallelGroup
from server.distributed.launch import spawn_group
from server.reft.plan import build_plan
from server.reft.reference import reference_generate
from tests.conftest import load_reference_model
from tests.engine_utils import prompt, random_adapter
from tests.test_cli_edges import truncated_weights
from tests.test_tensor_parallel import edit_batch, serves_like_the_reference, two_rank_server

HIDDEN = 128


def test_followers_load_the_plugins_rank_0_serves(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    with two_rank_server(model_dir, tmp_path, "--plugins", "tests.gated_reft_plugin") as server:
        adapter = random_adapter_file("gatedreft", (0, 2), 4, "f2+l2", HIDDEN, seed=5)
        serves_like_the_reference(server, model_dir, adapter, "gated")


def run_rank_0(module: str, *args: str) -> dict:
    """Run a helper that leads a group as rank 0; its JSON result. A hang fails the test."""
    command = [sys.executable, "-m", module, *args]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        out, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"the group hung ({' '.join(args)}):\n{err[-2000:]}")
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def run_with_fault(model_dir, tmp_path, side: str) -> dict:
    adapter_path = tmp_path / "a.safetensors"
    random_adapter_file("loreft", (0, 2), 4, "f2+l2", HIDDEN, seed=1).save(adapter_path)
    return run_rank_0("tests.tp_fault_run", str(model_dir), str(adapter_path), side)


@pytest.mark.parametrize("side", ["rank0", "follower"])
def test_a_fault_on_one_rank_never_gives_wrong_tokens_or_hangs(tiny_model_dir, tmp_path, side):
    model_dir = tiny_model_dir("llama")
    result = run_with_fault(model_dir, tmp_path, side)
    adapter = materialize(AdapterFile.load(tmp_path / "a.safetensors"), name="a", version=1)
    reference_model = load_reference_model(model_dir)
    assert result["errors"], "the fault must fail the step's requests"
    for i in range(4):
        rid = f"r{i}"
        if result["errors"].get(rid) is None:
            expected = reference_generate(
                reference_model, prompt(20 + 3 * i, seed=i), adapter if i % 2 else None, max_new_tokens=6
            )
            assert result["tokens"][rid] == expected, rid
        else:  # a later request may only fail if the group says it cannot serve
            assert i < 2 or result["problem"], result


def test_followers_edit_like_rank_0_when_two_adapters_share_a_digest():
    """Two names (or a reload) with one content: rank 0 holds two Adapter objects, the followers one."""
    a = random_adapter("a", "loreft", (0, 1), 4, "f1+l1", HIDDEN, seed=7)
    b = random_adapter("b", "loreft", (0, 1), 4, "f1+l1", HIDDEN, seed=7)
    assert a is not b and a.digest == b.digest
    batch = edit_batch([a, b])
    message = AdapterSender(max_bytes=2**30, max_count=4).message(batch)
    received = AdapterReceiver(torch.float32, torch.device("cpu")).batch(message)
    hidden = torch.randn(len(batch.token_ids), HIDDEN)
    on_rank_0, on_follower = hidden.clone(), hidden.clone()
    build_plan(batch.edits, "cpu").apply(0, on_rank_0)
    build_plan(received.edits, "cpu").apply(0, on_follower)
    assert torch.equal(on_rank_0, on_follower)


def test_a_failed_start_kills_the_followers_and_reports_its_error(tiny_model_dir, tmp_path):
    (tmp_path / "file").touch()
    result = run_rank_0("tests.tp_start_run", str(tiny_model_dir("llama")), str(tmp_path / "file" / "store"))
    assert "cannot open the store" in result["error"], result
    assert result["exit_codes"] == [-signal.SIGKILL], "the follower must not outlive rank 0's failed start"


def test_a_group_says_a_model_it_cannot_load_in_one_line(tiny_model_dir, tmp_path):
    """Every rank loads the files: rank 0 says why in one line, a follower that fails first logs it, and neither
    prints a traceback."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), model)
    truncated_weights(model)
    flags = ["--tensor-parallel", "2", "--device", "cpu", "--threads", "1", "--store", str(tmp_path / "store")]
    command = [sys.executable, "-m", "server.cli", "serve", "--model", str(model), *flags, "--log-json", "--port", "0"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"the group hung:\n{process.communicate()[1][-2000:]}")
    *logged, said = err.splitlines()
    assert process.returncode == 2, err[-3000:]
    assert said.startswith(f"error: --model {model}: cannot load it: Error while deserializing header: invalid")
    assert "Traceback" not in err and all(json.loads(line)["level"] for line in logged)


def test_followers_are_killed_when_rank_0_cannot_join(monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.setenv(name, "")  # spawn_group sets them: undone after the test
    spawned = []

    def cannot_join(backend, followers):
        spawned.extend(followers)
        raise RuntimeError("rank 0 cannot join")

    monkeypatch.setattr(TensorParallelGroup, "join", cannot_join)
    with pytest.raises(RuntimeError, match="rank 0 cannot join"):
        spawn_group(Settings(tensor_parallel=2, device="cpu"))
    assert [process.exitcode for process in spawned] == [-signal.SIGKILL]  # it would wait for the rendezvous


@pytest.mark.parametrize("first", ["ping", "stop"])
def test_a_wedged_follower_breaks_the_group_and_the_stop_still_ends(tiny_model_dir, first):
    result = run_rank_0("tests.tp_wedged_run", str(tiny_model_dir("llama")), first)
    assert "tensor-parallel rank is unreachable" in result["problem"], result
    if first == "ping":  # the engine's idle ping: readiness reports the wedged follower
        assert result["ping_error"] == result["problem"]
    assert result["seconds"] < 10, result  # one STEP_TIMEOUT (2 s) and a kill, not GROUP_TIMEOUT
    assert result["exit_codes"] == [-signal.SIGKILL]
