"""Provenance and lineage through the public CLI and HTTP API: train writes the data's hash, the
arguments, the losses and the base-model fingerprint; `adapters show`, `adapters diff`,
GET /v1/adapters/{name} and /v1/models report them per version."""

import json

import pytest

from server.adapters.fingerprint import model_fingerprint
from server.adapters.store import AdapterStore
from server.cli import main
from server.training.provenance import file_sha256
from tests.api_utils import ADMIN, running_app

PAIRS = [("Say hi", " hello"), ("Say bye", " goodbye"), ("Count", " one two")]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A store holding greeter@1 and greeter@2, trained by the CLI with different arguments."""
    root = tmp_path_factory.mktemp("lineage")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS))
    store = root / "store"
    common = ["train", "--model", str(tiny_model_dir("llama")), "--data", str(data), "--name", "greeter"]
    common += ["--layers", "0;2", "--store", str(store)]
    assert main([*common, "--epochs", "1", "--if-absent"]) == 0
    assert main([*common, "--epochs", "2", "--seed", "1", "--if-version", "1"]) == 0
    return store, data


def test_a_failing_precondition_stops_train_before_it_trains(trained, tiny_model_dir, capsys):
    store, data = trained
    argv = ["train", "--model", str(tiny_model_dir("llama")), "--data", str(data), "--name", "greeter"]
    assert main([*argv, "--layers", "0", "--store", str(store), "--if-absent"]) == 3
    err = capsys.readouterr().err
    assert "precondition failed: adapter 'greeter' is at version 2" in err and "step" not in err
    assert AdapterStore(store).versions("greeter") == [1, 2]


def test_show_prints_every_versions_provenance(trained, tiny_model_dir, capsys):
    store, data = trained
    capsys.readouterr()
    assert main(["adapters", "show", "greeter", "--store", str(store)]) == 0
    versions = json.loads(capsys.readouterr().out)["versions"]
    first, second = (v["config"] for v in versions)
    assert first["provenance"]["dataset"] == {"path": str(data), "sha256": file_sha256(data), "examples": 3}
    assert first["provenance"]["training_arguments"]["epochs"] == 1
    assert second["provenance"]["training_arguments"]["seed"] == 1
    assert len(second["provenance"]["epoch_losses"]) == 2
    assert second["provenance"]["best_loss"] == min(second["provenance"]["epoch_losses"])
    assert second["provenance"]["final_loss"] == second["provenance"]["epoch_losses"][-1]
    assert first["provenance"]["package_version"] and first["provenance"]["created"].endswith("+00:00")
    from transformers import AutoModelForCausalLM

    served = model_fingerprint(AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")))
    assert first["base_model_fingerprint"] == second["base_model_fingerprint"] == served


def test_diff_compares_config_provenance_and_parameters(trained, capsys):
    store, _ = trained
    capsys.readouterr()
    assert main(["adapters", "diff", "greeter@1", "greeter@2", "--store", str(store)]) == 0
    diff = json.loads(capsys.readouterr().out)
    assert diff["config"] == {}
    assert diff["provenance"]["training_arguments"][0]["epochs"] == 1
    assert diff["provenance"]["training_arguments"][1]["epochs"] == 2
    change = diff["parameters"]
    assert change["relative_change"] > 0 and change["only_in_first"] == change["only_in_second"] == []
    params = ("rotation", "weight", "bias")
    assert set(change["per_tensor"]) == {f"layers.{n}.{i}.{p}" for n in (0, 2) for i in (0, 1) for p in params}
    assert main(["adapters", "diff", "greeter@2", "greeter@2", "--store", str(store)]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["parameters"]["relative_change"] == 0 and same["provenance"] == {}
    assert main(["adapters", "diff", "greeter", "greeter@2", "--store", str(store)]) == 2
    assert "give a version" in capsys.readouterr().err


def test_http_shows_provenance_fingerprint_status_and_version_times(trained, tiny_model_dir):
    store, _ = trained
    with running_app(tiny_model_dir("llama"), store) as client:
        detail = client.get("/v1/adapters/greeter", headers=ADMIN).json()
        assert detail["fingerprint_status"] == "verified"
        assert [v["provenance"]["training_arguments"]["epochs"] for v in detail["details"]] == [1, 2]
        assert all(v["fingerprint_status"] == "verified" for v in detail["details"])
        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        created = AdapterStore(store).version_info("greeter", 2).created
        assert models["greeter"]["version"] == 2 and models["greeter"]["created"] == int(created)
        assert models["greeter"]["parent"] == models["greeter"]["root"] == tiny_model_dir("llama").name
        assert client.get("/ready").json()["adapters"] == {"stored": 1, "verified": 1, "unverified": 0, "foreign": 0}
