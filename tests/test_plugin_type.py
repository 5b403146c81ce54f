"""An intervention type from outside the package, end to end: registered by a plugin module with
parameter names of its own, trained in-process, validated by its orthonormal flag, imported from a
pyreft-style checkpoint, made at random, published, served by `reft-server serve --plugins` in a mixed
batch token for token as the reference path computes it, and listed with its type."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from server.adapters.errors import AdapterError
from server.adapters.materialize import materialize
from server.adapters.pyreft import import_pyreft
from server.adapters.random_adapters import random_adapter_file
from server.adapters.store import AdapterStore
from server.adapters.validation import validate
from server.reft.interventions import INTERVENTION_TYPES
from server.reft.reference import reference_generate
from server.training.data import parse_examples
from server.training.trainer import train_adapter
from tests import gated_reft_plugin
from tests.api_utils import ADMIN, ADMIN_TOKEN
from tests.conftest import load_reference_model
from tests.engine_utils import prompt
from tests.server_process import ServerProcess

PAIRS = [("Say hi:", "hello"), ("2 + 2 =", "4"), ("Sky:", "blue")]
HIDDEN = 128  # the tiny llama's hidden size


@pytest.fixture(scope="module")
def trained(tiny_model_dir):
    path = tiny_model_dir("llama")
    model, tokenizer = load_reference_model(path), AutoTokenizer.from_pretrained(path)
    examples = parse_examples(
        [f'{{"prompt": "{p}", "completion": "{c}"}}' for p, c in PAIRS], tokenizer, source="plugin test"
    )
    result = train_adapter(
        model, examples, layers=[0, 1, 3], intervention_type="gatedreft", rank=4, positions="f2+l2", epochs=3, lr=2e-2
    )
    return model, result.adapter


def test_the_plugin_type_is_in_the_table_and_trains_its_own_parameters(trained):
    assert INTERVENTION_TYPES["gatedreft"] is gated_reft_plugin.GATED_REFT
    _, adapter = trained
    validate(adapter)
    assert adapter.config.type == "gatedreft"
    assert {name.rsplit(".", 1)[1] for name in adapter.tensors} == {"basis", "source_weight", "source_bias", "gate"}
    assert adapter.tensors["layers.0.0.gate"].abs().max() > 0, "the gate starts at 0 and must have been trained"
    basis = adapter.tensors["layers.0.0.basis"]
    torch.testing.assert_close(basis.T @ basis, torch.eye(4), atol=1e-4, rtol=0)  # trained on the manifold


def test_its_orthonormal_parameter_is_validated_by_the_flag_not_the_name():
    adapter = random_adapter_file("gatedreft", (1, 2), 4, "f2+l2", HIDDEN, share_weights=False, seed=5)
    validate(adapter)  # random init follows the table: an orthonormal basis, the rest random
    adapter.tensors["layers.2.1.basis"] = adapter.tensors["layers.2.1.basis"] * 1.5
    with pytest.raises(AdapterError, match=r"tensors\.layers\.2\.1\.basis: columns are not orthonormal"):
        validate(adapter)


def test_a_pyreft_style_checkpoint_of_it_imports_under_its_own_names(trained, tmp_path):
    _, adapter = trained
    config = adapter.config
    keys, pyreft_keys = [], {"basis": "rotate_layer", "source_weight": "learned_source.weight"}
    pyreft_keys |= {"source_bias": "learned_source.bias", "gate": "gate_logits"}
    for index in range(2):  # unshared: #0 edits the first positions, #1 the last
        for layer in config.layers:
            key = f"layer_{layer}_comp_block_output_unit_pos_nunit_1#{index}"
            params = adapter.intervention_params(layer, index)
            state = {pyreft_keys[name]: tensor for name, tensor in params.items()}
            state["embed_dim"] = torch.tensor(HIDDEN)  # pyvene's bookkeeping: not a parameter
            torch.save(state, tmp_path / f"intkey_{key}.bin")
            keys.append(key)
    pyvene_config = {
        "sorted_keys": keys,
        "intervention_types": ["<class 'tests.gated_reft_plugin.GatedReftIntervention'>"] * len(keys),
        "representations": [[0, "block_output", "pos", 1, config.rank] for _ in keys],
    }
    (tmp_path / "config.json").write_text(json.dumps(pyvene_config))
    imported = import_pyreft(tmp_path, positions=config.positions, share_weights=False)
    assert (imported.config.type, imported.config.rank, imported.config.hidden_size) == ("gatedreft", 4, HIDDEN)
    assert imported.config.layers == config.layers
    assert imported.tensors.keys() == adapter.tensors.keys()
    assert all(torch.equal(imported.tensors[name], adapter.tensors[name]) for name in adapter.tensors)


def test_its_orthonormal_parameter_also_imports_from_torchs_parametrization(tmp_path):
    torch.manual_seed(0)
    rotation = torch.nn.utils.parametrizations.orthogonal(torch.nn.Linear(4, HIDDEN, bias=False))
    state = {f"rotate_layer.{key}": tensor for key, tensor in rotation.state_dict().items()}
    state |= {"learned_source.weight": torch.randn(4, HIDDEN) * 0.1, "learned_source.bias": torch.zeros(4)}
    state["gate_logits"] = torch.zeros(4)
    torch.save(state, tmp_path / "intkey_layer_3_comp_block_output_unit_pos_nunit_1#0.bin")
    imported = import_pyreft(tmp_path, positions="f1", share_weights=True, intervention_type="gatedreft")
    torch.testing.assert_close(imported.tensors["layers.3.0.basis"], rotation.weight.detach(), rtol=1e-5, atol=1e-6)


def test_served_by_a_plugin_server_in_a_mixed_batch_token_for_token(trained, tiny_model_dir, tmp_path):
    reference_model, adapter_file = trained
    hidden = reference_model.config.hidden_size
    plain_file = random_adapter_file("loreft", (1, 2), 4, "f3+l3", hidden, seed=3)
    store = AdapterStore(tmp_path / "store")
    store.publish("gated", adapter_file.to_bytes())
    store.publish("plain", plain_file.to_bytes())
    model = str(tiny_model_dir("llama"))
    args = ("--model", model, "--store", str(store.root), "--plugins", "tests.gated_reft_plugin")
    args += ("--admin-token", ADMIN_TOKEN, "--kv-cache-memory", "32MiB", "--max-model-len", "512")
    requests = [("gated", prompt(9 + 7 * i, 300 + i)) for i in range(3)]
    requests += [("plain", prompt(12 + 5 * i, 400 + i)) for i in range(2)]
    requests += [(None, prompt(15 + 3 * i, 500 + i)) for i in range(2)]
    adapters = {
        "gated": materialize(adapter_file, name="gated"),
        "plain": materialize(plain_file, name="plain"),
        None: None,
    }
    with ServerProcess(tmp_path / "server.log", *args) as server:

        def generate(request):
            name, ids = request
            body = {"input_ids": ids, "max_new_tokens": 8, "ignore_eos": True, "adapter": name}
            response = httpx.post(f"{server.url}/v1/generate", json=body, timeout=60)
            assert response.status_code == 200, response.text
            return response.json()["token_ids"]

        with ThreadPoolExecutor(len(requests)) as pool:  # all at once: they share engine steps
            served = list(pool.map(generate, requests))
        listed = httpx.get(f"{server.url}/v1/adapters", headers=ADMIN, timeout=10).json()
    for (name, ids), tokens in zip(requests, served, strict=True):
        with torch.no_grad():
            assert tokens == reference_generate(reference_model, ids, adapters[name], max_new_tokens=8), name
    assert {entry["name"]: entry["type"] for entry in listed} == {"gated": "gatedreft", "plain": "loreft"}
