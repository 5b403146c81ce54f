"""The command line and the adapter management surface at their edges: unusable stores, bad settings, Ctrl-C,
failed writes, unreadable names, If-None-Match on every write, model paths that name no model, mistakes
at start-up (found by reviews of that surface)."""

import json
import multiprocessing
import os
import shutil
import signal
import socket

import pytest
import torch

import server.app
import server.distributed.launch
from server.adapters.random_adapters import random_adapter_file
from server.adapters.store import AdapterStore
from server.cli import main
from server.model_location import check_tokenizer, model_location
from server.start_checks import check_address
from tests.api_utils import ADMIN, running_app
from tests.conftest import FIXTURE

CHECKPOINT = str(FIXTURE / "adapters" / "lo_l2_f1l1")


def adapter_bytes(seed: int) -> bytes:
    spec = {"kind": "loreft", "layers": (1, 4), "rank": 4, "positions": "f2+l2", "hidden_size": 192}
    return random_adapter_file(seed=seed, **spec).to_bytes()


def import_lo(store, name: str = "lo") -> int:
    args = ["adapters", "import-pyreft", CHECKPOINT, "--name", name, "--positions", "f1+l1", "--share-weights"]
    return main([*args, "--store", str(store)])


def test_a_store_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("x")
    assert main(["adapters", "--store", str(not_a_directory), "list"]) == 2
    assert str(not_a_directory) in capsys.readouterr().err


def test_serve_refuses_an_unsupported_store_before_anything_loads(capsys):
    assert main(["serve", "--store", "ftp://host/adapters"]) == 2
    assert "--store" in capsys.readouterr().err


def test_an_invalid_setting_names_its_flag(capsys):
    assert main(["serve", "--kv-cache-memory", "lots"]) == 2
    err = capsys.readouterr().err
    assert "--kv-cache-memory:" in err and "function-after" not in err


@pytest.mark.parametrize("variable", ["REFT_API_KEY", "REFT_ADMIN_TOKEN"])
def test_an_empty_token_refuses_to_start(monkeypatch, capsys, variable):
    """An empty secret would be a token nobody can send: every request a 401, and nothing to say why."""
    monkeypatch.setenv(variable, " ")
    assert main(["serve"]) == 2
    assert f"--{variable.removeprefix('REFT_').lower().replace('_', '-')}: Value error, is set but empty" in (
        capsys.readouterr().err
    )


def test_ctrl_c_in_an_adapters_action_exits_without_a_traceback(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(AdapterStore, "publish", interrupted)
    assert import_lo(tmp_path / "store") == 130
    assert "interrupted" in capsys.readouterr().err


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    store = AdapterStore(tmp_path / "store")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        store.publish("lo", b"x" * 1000)
    assert list((tmp_path / "store" / ".tmp").iterdir()) == []


def test_cli_list_shows_every_adapter_when_one_is_unreadable(tmp_path, capsys):
    store = tmp_path / "store"
    assert import_lo(store, "a") == 0 and import_lo(store, "b") == 0 and import_lo(store, "c") == 0
    (store / "a" / "versions" / "000001.safetensors").write_bytes(b"junk")
    (store / "b" / "current").write_text("garbage")
    capsys.readouterr()
    assert main(["adapters", "list", "--store", str(store)]) == 2
    captured = capsys.readouterr()
    assert [line.split("\t")[0] for line in captured.out.splitlines()] == ["c"]
    assert "error: a: file:" in captured.err and "error: b: invalid literal" in captured.err


def test_admin_list_survives_an_unreadable_pointer(tmp_path):
    store = tmp_path / "store"
    with running_app(FIXTURE / "model", store) as client:
        for name in ("a", "b"):
            uploaded = client.post(f"/v1/adapters/{name}", files={"file": ("a", adapter_bytes(1))}, headers=ADMIN)
            assert uploaded.status_code == 201
        (store / "a" / "current").write_text("garbage")
        listing = client.get("/v1/adapters", headers=ADMIN)
        assert listing.status_code == 200 and [a["name"] for a in listing.json()] == ["b"]


def test_if_none_match_is_not_ignored_on_delete_and_roll_back(tmp_path):
    with running_app(FIXTURE / "model", tmp_path / "store") as client:
        assert client.post("/v1/adapters/a", files={"file": ("a", adapter_bytes(1))}, headers=ADMIN).status_code == 201
        create_only = {**ADMIN, "If-None-Match": "*"}
        rolled = client.put("/v1/adapters/a/current", json={"version": 1}, headers=create_only)
        assert rolled.status_code == 412
        assert client.delete("/v1/adapters/a", headers=create_only).status_code == 412
        assert client.get("/v1/adapters/a", headers=ADMIN).status_code == 200, "a failed precondition deletes nothing"


def test_train_refuses_a_store_or_name_it_cannot_publish_to_before_training(tmp_path, capsys, monkeypatch):
    import server.training.cli as train_cli

    def never(*args, **kwargs):
        raise AssertionError("trained although the publish could only fail")

    monkeypatch.setattr(train_cli, "train_adapter", never)
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    model = str(FIXTURE / "model")
    base = ["train", "--model", model, "--data", str(data), "--layers", "1"]
    assert main([*base, "--name", "lo", "--store", "ftp://host/adapters"]) == 1
    assert "unsupported store" in capsys.readouterr().err
    assert main([*base, "--name", "bad/name", "--store", str(tmp_path / "store")]) == 1
    assert "invalid adapter name" in capsys.readouterr().err


@pytest.fixture
def not_models(tmp_path, monkeypatch):
    """A working directory and a home in which these --model values name no model directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models" / "empty").mkdir(parents=True)
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    return tmp_path


NOT_MODELS = [
    ("/nonexistent/model", "no such directory"),
    ("./missing", "no such directory"),
    ("../missing", "no such directory"),
    ("~/missing", "no such directory"),
    ("models/missing", "no such directory"),  # it could be a Hub id, but models/ is a local directory
    ("weights.safetensors", "not a directory"),
    ("models/empty", "no config.json"),
]


TAKING_A_MODEL = [
    ["adapters", "import-pyreft", CHECKPOINT, "--name", "lo", "--positions", "f1+l1"],
    ["adapters", "pull", "someone/lo-reft", "--name", "lo"],
    ["train", "--data", "data.jsonl", "--name", "lo"],
]


@pytest.mark.parametrize("command", TAKING_A_MODEL, ids=["import-pyreft", "pull", "train"])
@pytest.mark.parametrize("text, message", NOT_MODELS)
def test_a_model_path_that_names_no_model_is_a_usage_error(not_models, capsys, command, text, message):
    """Not a Hub lookup with a message about repo ids or the network, as transformers would answer."""
    with pytest.raises(SystemExit) as exited:
        main([*command, "--model", text])
    assert exited.value.code == 2
    assert f"argument --model: {text}: {message}" in capsys.readouterr().err


def test_hub_ids_and_model_directories_are_models(not_models):
    assert model_location("someone/llama") == "someone/llama" and model_location("gpt2") == "gpt2"
    (not_models / "models" / "empty" / "config.json").write_text("{}")
    assert model_location("~/models/empty") == str(not_models / "models" / "empty")
    check_tokenizer("someone/llama")  # a Hub id's files are transformers' to find


@pytest.fixture
def app_never_built(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the app was built: the mistake would surface as its start's traceback")

    monkeypatch.setattr(server.app, "create_app", never)


@pytest.mark.parametrize("text, message", NOT_MODELS)
def test_serve_refuses_a_model_path_that_names_no_model_in_one_line(not_models, app_never_built, capsys, text, message):
    assert main(["serve", "--model", text, "--store", str(not_models / "store"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --model: {text}: {message}") and err.count("\n") == 1


def test_serve_refuses_a_store_it_cannot_open_in_one_line(tmp_path, app_never_built, capsys):
    in_the_way = tmp_path / "store"
    in_the_way.write_text("not a directory")
    assert main(["serve", "--model", str(FIXTURE / "model"), "--store", str(in_the_way), "--port", "0"]) == 2
    assert capsys.readouterr().err == f"error: cannot open the store {str(in_the_way)!r}: Not a directory\n"


def test_an_unexpected_start_up_error_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(server.app, "create_app", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["serve", "--model", str(FIXTURE / "model"), "--store", str(tmp_path / "store"), "--port", "0"])


def serve_the_fixture_model(tmp_path, *flags: str) -> int:
    return main(["serve", "--model", str(FIXTURE / "model"), "--store", str(tmp_path / "store"), "--port", "0", *flags])


@pytest.fixture
def group_never_spawned(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("tensor-parallel ranks were spawned: the mistake would surface in their start")

    monkeypatch.setattr(server.distributed.launch, "spawn_group", never)


def test_serve_refuses_a_degree_that_splits_the_models_heads_in_one_line(
    tmp_path, app_never_built, group_never_spawned, capsys
):
    assert serve_the_fixture_model(tmp_path, "--device", "cpu", "--tensor-parallel", "3") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --tensor-parallel: tensor parallel degree 3 must divide the model's 8 attention")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "cuda_built, reason",
    [(False, f"torch here has no CUDA (torch {torch.__version__})"), (True, f"torch {torch.__version__} sees no CUDA")],
)
def test_serve_refuses_a_device_torch_does_not_have_in_one_line(
    tmp_path, monkeypatch, app_never_built, capsys, cuda_built, reason
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: cuda_built)
    assert serve_the_fixture_model(tmp_path, "--device", "cuda") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --device cuda: {reason}") and err.count("\n") == 1


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_serve_refuses_more_ranks_than_gpus_in_one_line(
    tmp_path, monkeypatch, app_never_built, group_never_spawned, capsys, device
):
    """Rank r uses GPU r: without one, it would fail in a spawned process, under torch's traceback."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert serve_the_fixture_model(tmp_path, "--device", device, "--tensor-parallel", "2") == 2
    assert capsys.readouterr().err == "error: --tensor-parallel 2: a GPU per rank, and torch sees 1\n"


@pytest.fixture
def weights_only(tmp_path):
    """A model directory with weights and config.json alone, no tokenizer."""
    directory = tmp_path / "model"
    directory.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(FIXTURE / "model" / name, directory)
    return directory


def test_serve_refuses_a_model_directory_without_its_tokenizer_in_one_line(
    tmp_path, weights_only, app_never_built, capsys
):
    """transformers' AutoTokenizer would fail in the app's start."""
    assert main(["serve", "--model", str(weights_only), "--store", str(tmp_path / "store"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --model: {weights_only}: no tokenizer in this directory (none of tokenizer.json, ")
    assert err.count("\n") == 1


def test_serve_refuses_an_address_in_use_before_the_model_loads(tmp_path, app_never_built, capsys):
    """uvicorn binds only once the model has loaded: the mistake would cost the load, then exit 3."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert serve_the_fixture_model(tmp_path, "--host", "127.0.0.1", "--port", str(port)) == 2
    assert capsys.readouterr().err == f"error: --host/--port 127.0.0.1:{port}: Address already in use\n"


def test_serve_refuses_a_torchrun_world_of_another_size_in_one_line(tmp_path, monkeypatch, app_never_built, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert serve_the_fixture_model(tmp_path, "--device", "cpu") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: torchrun started 2 processes but --tensor-parallel is 1") and err.count("\n") == 1


def test_serve_refuses_a_demo_directory_it_cannot_write_in_one_line(tmp_path, app_never_built, capsys):
    in_the_way = tmp_path / "file"
    in_the_way.write_text("not a directory")
    store = str(tmp_path / "store")
    assert main(["serve", "--demo", "tiny", "--demo-dir", str(in_the_way / "demo"), "--store", store]) == 2
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert last_line == f"error: cannot prepare the tiny demo: [Errno 20] Not a directory: '{in_the_way}/demo/tiny-v2'"


def test_train_refuses_a_model_directory_without_its_tokenizer_as_a_usage_error(tmp_path, weights_only, capsys):
    """Not transformers' message of many lines, which suggests the Hub."""
    with pytest.raises(SystemExit) as exited:
        main(["train", "--model", str(weights_only), "--data", "data.jsonl", "--name", "lo", "--layers", "1"])
    assert exited.value.code == 2
    assert f"argument --model: {weights_only}: no tokenizer in this directory (" in capsys.readouterr().err


@pytest.fixture
def signal_handlers_kept():
    """serve() takes SIGINT and SIGTERM for the rest of its process: pytest's handlers come back after."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def test_serve_refuses_the_process_engine_core_for_a_group_in_one_line(
    tmp_path, app_never_built, group_never_spawned, capsys
):
    assert (
        serve_the_fixture_model(tmp_path, "--device", "cpu", "--engine-core", "process", "--tensor-parallel", "2") == 2
    )
    assert capsys.readouterr().err.startswith("error: --engine-core process: not with --tensor-parallel 2, whose rank")


def test_serve_refuses_a_group_on_gpus_without_the_kv_cache_size_in_one_line(
    tmp_path, monkeypatch, app_never_built, group_never_spawned, capsys
):
    """Sizing the KV cache from the GPU's memory is a warm-up step of one rank: the engine refuses it in a group."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert serve_the_fixture_model(tmp_path, "--device", "cuda", "--tensor-parallel", "2") == 2
    assert capsys.readouterr().err.startswith(
        "error: --tensor-parallel 2: give the KV cache's size (--kv-cache-memory)"
    )


ENGINE_REFUSALS = [
    (["--max-model-len", "4096"], "--max-model-len: 4096 exceeds the model's context window 1024"),
    (["--kv-cache-memory", "1KiB"], "--kv-cache-memory: 1024 bytes hold no block of the KV cache: one of 16 tokens"),
    (
        ["--kv-cache-memory", "2MiB", "--max-model-len", "1000"],
        "--kv-cache-memory/--max-model-len: the KV cache holds 432 tokens, less than 1000 plus one block",
    ),
    (["--max-batched-tokens", "4", "--max-num-seqs", "8"], "--max-batched-tokens/--max-num-seqs: 4 tokens a step"),
]


@pytest.mark.parametrize("flags, message", ENGINE_REFUSALS, ids=["window", "no-block", "kv-cache", "batch"])
def test_serve_refuses_settings_the_engine_refuses_in_one_line(tmp_path, signal_handlers_kept, capsys, flags, message):
    """Found only once the model is loaded, as the engine is built in the app's start: uvicorn would log
    the traceback and exit 3. Nothing listens meanwhile, so the port is free again."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert serve_the_fixture_model(tmp_path, "--device", "cpu", "--port", str(port), *flags) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"error: {message}") and "Traceback" not in err
    check_address("127.0.0.1", port)


def test_an_engine_process_says_a_setting_it_refuses_in_one_line_and_exits(tmp_path, signal_handlers_kept, capsys):
    flags = ("--device", "cpu", "--engine-core", "process", "--max-model-len", "4096")
    assert serve_the_fixture_model(tmp_path, *flags) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "error: --max-model-len: 4096 exceeds the model's context window 1024"
    assert "Traceback" not in err and not multiprocessing.active_children()


def test_a_bug_in_the_engines_build_keeps_its_traceback(tmp_path, monkeypatch, signal_handlers_kept):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(server.app, "serving_core", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        serve_the_fixture_model(tmp_path, "--device", "cpu")


def unknown_model_type(directory):
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "nosuchmodel"}))


def truncated_weights(directory):
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # its header (its length, then JSON) runs past the end


def corrupt_tokenizer(directory):
    (directory / "tokenizer.json").write_text('{"broken')


BROKEN_MODELS = [
    (unknown_model_type, "cannot load it: The checkpoint you are trying to load has model type `nosuchmodel`"),
    (truncated_weights, "cannot load it: Error while deserializing header: invalid header length"),
    (corrupt_tokenizer, "cannot load its tokenizer: Unterminated string starting at: line 1 column 2"),
]


@pytest.mark.parametrize("engine_core", ["thread", "process"])
@pytest.mark.parametrize("breaks, reason", BROKEN_MODELS, ids=["model-type", "weights", "tokenizer"])
def test_serve_says_a_model_it_cannot_load_in_one_line(
    tmp_path, tiny_model_dir, signal_handlers_kept, capfd, engine_core, breaks, reason
):
    """Not transformers' traceback, from the server's process or the engine's (capfd: the engine process's
    stderr too). JSON log lines may come first."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), model)
    breaks(model)
    flags = ("--device", "cpu", "--engine-core", engine_core, "--store", str(tmp_path / "store"), "--log-json")
    assert main(["serve", "--model", str(model), *flags, "--port", "0"]) == 2
    err = capfd.readouterr().err
    *logged, said = err.splitlines()
    assert said.startswith(f"error: --model {model}: {reason}")
    assert "Traceback" not in err and all(json.loads(line)["level"] for line in logged)
    assert not multiprocessing.active_children()


def test_train_and_adapter_imports_say_a_model_they_cannot_load_in_one_line(tmp_path, tiny_model_dir, capsys):
    """`train --model` and `adapters import-pyreft --model` load the model too: the same one line, no traceback."""
    from tests.conftest import FIXTURE
    from tests.test_train import run_cli

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), model)
    truncated_weights(model)
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    assert run_cli(model, data, "--layers", "0", "--out", tmp_path / "a.safetensors") == 1
    err = capsys.readouterr().err
    assert f"error: --model {model}: cannot load it: Error while deserializing header" in err and "Traceback" not in err
    checkpoint = FIXTURE / "adapters" / "lo_l14_f3l3_unshared"
    imported = ["adapters", "--store", str(tmp_path / "store"), "import-pyreft", str(checkpoint), "--name", "lo"]
    imported += ["--positions", "f3+l3"]
    assert main([*imported, "--model", str(model)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --model {model}: cannot load it: ") and "Traceback" not in err
