"""An intervention type from outside the package, end to end: registered by a plugin module, trained
in-process, published, served by `reft-server serve --plugins` in a mixed batch token for token as the
reference path computes it, and listed with its type."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from server.adapters.format import validate
from server.adapters.store import AdapterStore
from server.reft.adapter import Adapter
from server.reft.interventions import INTERVENTION_TYPES
from server.reft.reference import reference_generate
from server.tiny_models import random_adapter_file
from server.training.data import parse_examples
from server.training.trainer import train_adapter
from tests import gated_reft_plugin
from tests.api_utils import ADMIN, ADMIN_TOKEN
from tests.conftest import load_reference_model
from tests.engine_utils import prompt
from tests.server_process import ServerProcess

PAIRS = [("Say hi:", "hello"), ("2 + 2 =", "4"), ("Sky:", "blue")]


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


def test_the_plugin_type_is_in_the_table_and_trains_its_own_parameter(trained):
    assert INTERVENTION_TYPES["gatedreft"] is gated_reft_plugin.GATED_REFT
    _, adapter = trained
    validate(adapter)  # its rotation is checked for orthonormality like a built-in type's
    assert adapter.config.type == "gatedreft"
    assert adapter.tensors["layers.0.0.gate"].abs().max() > 0, "the gate starts at 0 and must have been trained"


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
        "gated": Adapter.from_file(adapter_file, name="gated"),
        "plain": Adapter.from_file(plain_file, name="plain"),
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
