"""Tensor parallelism on CPU with gloo: two processes on a tiny Llama (4 heads, 2 KV heads) give the
same tokens as one process and the reference, adapters included; a dead rank fails readiness."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from server.adapters.format import AdapterFile
from server.adapters.materialize import materialize
from server.adapters.random_adapters import random_adapter_file
from server.config import Settings
from server.distributed.adapter_mirror import AdapterReceiver, AdapterSender
from server.distributed.launch import join_torchrun_group
from server.engine.kv_cache import KVLayout
from server.engine.model_runner import StepBatch
from server.models.loader import check_tensor_parallel
from server.models.tiny import tiny_config
from server.reft.adapter import Adapter
from server.reft.reference import reference_generate
from server.reft.request_edit import RequestEdit
from tests.api_utils import ADMIN, ADMIN_TOKEN
from tests.conftest import load_reference_model
from tests.engine_utils import load_engine_model, make_core, prompt, random_adapter, run_core, seq
from tests.server_process import ServerProcess
from tests.test_server_process import upload, wait_for
from tests.tp_engine_run import CORE_CONFIG

HIDDEN = 128
ADAPTER_SPECS = [  # type, layers, rank, positions, share_weights
    ("loreft", (0, 2), 4, "f2+l2", True),
    ("noreft", (1,), 4, "l3", True),
    ("direft", (3,), 2, "f1+l1", False),
]


def workload(adapter_paths: list[str]) -> list[dict]:
    """Mixed adapters and base, staggered arrivals, some prompts sharing a prefix (prefix cache hits), some
    scored (prompt logprobs)."""
    shared = prompt(21, seed=99)
    items = []
    for i in range(10):
        own = prompt(2 + 7 * i, seed=i)
        items.append(
            {
                "id": f"r{i}",
                "prompt": shared + own[1:] if i % 2 else own,  # r1, r5, r9 share an adapter; r3, r7 none
                "adapter": [*adapter_paths, None][i % 4],
                "arrival": i // 2,
                "prompt_logprobs": 2 if i % 3 == 0 else None,
            }
        )
    return items


@pytest.mark.parametrize("multiple", [1, 8])  # eager steps padded to a multiple of 8 tokens on every rank
def test_two_ranks_give_the_tokens_of_one_process_and_the_reference(tiny_model_dir, tmp_path, multiple):
    model_dir = tiny_model_dir("llama")
    paths = []
    for seed, spec in enumerate(ADAPTER_SPECS):
        paths.append(str(tmp_path / f"a{seed}.safetensors"))
        random_adapter_file(*spec[:3], spec[3], HIDDEN, spec[4], seed=seed).save(paths[-1])
    items = workload(paths)
    (tmp_path / "workload.json").write_text(json.dumps(items))
    # followers may hold 2 of the 3 adapters: they must drop and receive them again as the steps go
    workload_path = str(tmp_path / "workload.json")
    command = [sys.executable, "-m", "tests.tp_engine_run", str(model_dir), workload_path, "2", str(multiple)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["kv_heads_per_rank"] == 1  # 2 KV heads over 2 ranks

    adapters = {p: materialize(AdapterFile.load(p), name=Path(p).stem, version=1) for p in paths}
    core = make_core(load_engine_model(model_dir), step_token_multiple=multiple, **CORE_CONFIG)
    requests = [
        (
            seq(
                i["id"], i["prompt"], adapters.get(i["adapter"]), max_new_tokens=8, prompt_logprobs=i["prompt_logprobs"]
            ),
            i["arrival"],
        )
        for i in items
    ]
    scored = {}
    one_process = run_core(core, requests, scored=scored)
    assert core.kv.prefix_hits > 0
    assert scored.keys() == result["scored"].keys() and len(scored) == 4
    for request_id, logprobs in scored.items():
        assert result["scored"][request_id] == pytest.approx(logprobs, abs=1e-4)
    reference_model = load_reference_model(model_dir)
    steered = 0
    for item in items:
        adapter = adapters.get(item["adapter"])
        reference = reference_generate(reference_model, item["prompt"], adapter, max_new_tokens=8)
        assert result["tokens"][item["id"]] == one_process[item["id"]] == reference, item["id"]
        if adapter is not None:
            steered += reference != reference_generate(reference_model, item["prompt"], None, max_new_tokens=8)
    assert steered >= 3, "the adapters must change outputs, or the comparison proves nothing"


def two_rank_server(model_dir: Path, tmp_path: Path, *extra: str) -> ServerProcess:
    """`reft-server serve --tensor-parallel 2` on the tiny model (spawned follower), as a context manager."""
    args = ("--model", str(model_dir), "--store", str(tmp_path / "store"), "--tensor-parallel", "2")
    args += ("--kv-cache-memory", "8MiB", "--max-model-len", "256", "--admin-token", ADMIN_TOKEN, *extra)
    return ServerProcess(tmp_path / "server.log", *args, env={"OMP_NUM_THREADS": "1"})


def serves_like_the_reference(server: ServerProcess, model_dir: Path, adapter: AdapterFile, name: str) -> dict:
    """Upload `adapter` as `name`: its greedy tokens over HTTP equal the slow reference's. Returns the
    request's body, to send again."""
    upload(server.url, name, adapter.to_bytes())
    ids = prompt(30, seed=3)
    body = {"input_ids": ids, "adapter": name, "max_new_tokens": 6, "temperature": 0}
    reply = httpx.post(f"{server.url}/v1/generate", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    expected = reference_generate(
        load_reference_model(model_dir), ids, materialize(adapter, name=name), max_new_tokens=6
    )
    assert reply.json()["token_ids"] == expected
    return body


def test_a_dead_rank_fails_readiness_and_requests(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    with two_rank_server(model_dir, tmp_path) as server:
        adapter = random_adapter_file("loreft", (0, 2), 4, "f2+l2", HIDDEN, seed=5)
        body = serves_like_the_reference(server, model_dir, adapter, "steer")

        (follower,) = spawned_children(server.process.pid)
        os.kill(follower, signal.SIGKILL)
        ready = wait_for(lambda: (r := httpx.get(f"{server.url}/ready", timeout=5)).status_code == 503 and r)
        assert any("tensor-parallel rank 1" in p and "code -9" in p for p in ready.json()["problems"]), ready.text
        failed = httpx.post(f"{server.url}/v1/generate", json=body, timeout=60)
        assert failed.status_code == 503 and "tensor-parallel rank 1" in failed.text, failed.text
        assert httpx.get(f"{server.url}/v1/adapters", headers=ADMIN, timeout=5).status_code == 200


def spawned_children(pid: int) -> list[int]:
    """Processes that multiprocessing's spawn started under `pid` (not its resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def test_degrees_that_split_kv_heads_are_refused():
    config = tiny_config("llama")  # 4 attention heads, 2 KV heads
    check_tensor_parallel(config, 2)
    with pytest.raises(ValueError, match="must divide the model's 4 attention heads and 2 KV heads"):
        check_tensor_parallel(config, 4)
    with pytest.raises(ValueError, match="no tensor-parallel plan for gpt2"):
        check_tensor_parallel(tiny_config("gpt2"), 2)
    layout = KVLayout.from_config(config, torch.float32)
    assert layout.sharded(2).num_kv_heads == 1
    assert layout.sharded(2).bytes_per_token() * 2 == layout.bytes_per_token()


def test_torchrun_world_size_must_match_the_flag(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="torchrun started 2 processes but --tensor-parallel is 1"):
        join_torchrun_group(Settings(tensor_parallel=1))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert join_torchrun_group(Settings(tensor_parallel=1)) is None


def edit_batch(adapters: list[Adapter]) -> StepBatch:
    edits = [RequestEdit.for_prompt(a, 4).rows(f"seq{i}", 4 * i, 0, 4) for i, a in enumerate(adapters)]
    rows = 4 * len(adapters)
    return StepBatch(list(range(rows)), list(range(rows)), list(range(rows)), [], edits, [rows - 1], [])


def test_followers_get_each_adapter_once_and_drop_it_over_budget():
    a, b, c = (random_adapter(n, "loreft", (0, 1), 4, "f1+l1", HIDDEN, seed=s) for s, n in enumerate("abc"))
    sender = AdapterSender(max_bytes=2**30, max_count=2)
    receiver = AdapterReceiver(torch.float32, torch.device("cpu"))

    first = sender.message(edit_batch([a, b]))
    assert set(first.new_adapters) == {a.digest, b.digest} and not first.dropped_adapters
    received = receiver.batch(first)
    assert [chunk.owner for chunk in received.edits] == [0, 1]  # rank 0's sequences stay on rank 0
    hidden = torch.randn(3, HIDDEN)
    for sent, got in zip([a, b], [chunk.adapter for chunk in received.edits], strict=True):
        for layer, interventions in sent.layers.items():
            assert torch.equal(interventions[0](hidden), got.layers[layer][0](hidden))

    again = sender.message(edit_batch([b]))
    assert not again.new_adapters  # already there
    receiver.batch(again)
    third = sender.message(edit_batch([c]))  # over the count budget: a, least recently used, goes
    assert set(third.new_adapters) == {c.digest} and third.dropped_adapters == [a.digest]
    receiver.batch(third)
    assert set(receiver.adapters) == {b.digest, c.digest}
    back = sender.message(edit_batch([a]))
    assert set(back.new_adapters) == {a.digest} and back.dropped_adapters == [b.digest]
