"""Adapter training: memorization on a tiny random Llama, every type, the export, data errors, the CLI."""

import argparse
import json

import pytest
import torch
from transformers import AutoTokenizer

from server.adapters.format import AdapterFile, tensor_name
from server.adapters.model_shape import ModelShape
from server.adapters.options import parse_layers
from server.adapters.validation import validate
from server.reft.interventions import INTERVENTION_TYPES
from server.tokenization import encode_chat, encode_prompt
from server.training.cli import add_train_arguments, run_train
from server.training.data import load_examples, parse_examples
from server.training.evaluate import greedy_completions, reproduced
from server.training.modules import TrainableAdapter
from server.training.trainer import _batch_loss, train_adapter
from tests.conftest import load_reference_model

PAIRS = [
    ("The capital of France is", "Paris."),
    ("2 + 2 =", "4"),
    ("Color of the sky:", "blue"),
    ("Say hi:", "hello there"),
]
# Memorizes 4/4 on the default tiny Llama (4 layers, hidden 128) for every seed tried, in ~2 s.
MEMORIZE = dict(rank=8, positions="f5+l5", epochs=60, lr=2e-2, batch_size=2)
SHORT = dict(rank=4, positions="f2+l2", epochs=3, lr=2e-2, batch_size=2)
ALL_LAYERS = [0, 1, 2, 3]


def jsonl(records) -> list[str]:
    return [json.dumps(record) for record in records]


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    path = tiny_model_dir("llama")
    return load_reference_model(path), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def examples(llama):
    _, tokenizer = llama
    return parse_examples(jsonl({"prompt": p, "completion": c} for p, c in PAIRS), tokenizer)


@pytest.fixture(scope="module")
def loreft(llama, examples):
    """LoReFT with AdamW weight decay on: the rotation must not decay (the training trap)."""
    model, _ = llama
    return train_adapter(model, examples, layers=ALL_LAYERS, weight_decay=0.01, base_model="tiny-llama", **MEMORIZE)


def test_loreft_memorizes_the_training_completions(llama, examples, loreft):
    model, tokenizer = llama
    assert reproduced(model, loreft.adapter, examples, tokenizer.eos_token_id) == [True] * len(examples)
    assert not any(reproduced(model, None, examples, tokenizer.eos_token_id))
    assert loreft.final_loss < loreft.epoch_losses[0] / 10


def test_rotation_stays_orthonormal_with_weight_decay(loreft):
    rotations = [t for name, t in loreft.adapter.tensors.items() if name.endswith(".rotation")]
    assert len(rotations) == 2 * len(ALL_LAYERS)
    for rotation in rotations:
        torch.testing.assert_close(rotation.T @ rotation, torch.eye(8), atol=1e-5, rtol=0)


def test_weight_decay_never_reaches_the_rotation():
    adapter = TrainableAdapter(INTERVENTION_TYPES["loreft"], 16, 4, (0, 1), per_layer=2)
    rotation_ids = {id(p) for name, p in adapter.named_parameters() if ".rotation." in name}
    decayed = [p for group in adapter.parameter_groups(0.1) if group["weight_decay"] > 0 for p in group["params"]]
    assert rotation_ids and decayed
    assert not rotation_ids & {id(p) for p in decayed}


def test_export_validates_round_trips_and_generates_the_same(llama, examples, loreft):
    model, tokenizer = llama
    adapter = loreft.adapter
    validate(adapter, ModelShape(num_layers=4, hidden_size=128))
    config = adapter.config
    assert (config.type, config.rank, config.hidden_size, config.layers) == ("loreft", 8, 128, tuple(ALL_LAYERS))
    assert (config.positions, config.share_weights, config.activation) == ("f5+l5", False, "linear")
    assert (config.base_model, config.dtype) == ("tiny-llama", "float32")
    params = ("rotation", "weight", "bias")
    expected = {tensor_name(layer, index, p) for layer in ALL_LAYERS for index in (0, 1) for p in params}
    assert set(adapter.tensors) == expected
    assert loreft.trained_parameters == sum(t.numel() for t in adapter.tensors.values())

    copy = AdapterFile.from_bytes(adapter.to_bytes())
    prompts = [e.prompt_ids for e in examples]
    eos = tokenizer.eos_token_id
    assert greedy_completions(model, copy, prompts, eos_token_id=eos) == greedy_completions(
        model, adapter, prompts, eos_token_id=eos
    )


def test_noreft_memorizes_and_serves(llama, examples):
    model, tokenizer = llama
    result = train_adapter(model, examples, layers=ALL_LAYERS, intervention_type="noreft", **MEMORIZE)
    assert {name.rsplit(".", 1)[1] for name in result.adapter.tensors} == {"weight", "bias", "proj_weight", "proj_bias"}
    assert reproduced(model, result.adapter, examples, tokenizer.eos_token_id) == [True] * len(examples)


@pytest.mark.parametrize("kind", ["direft", "nodireft", "consreft", "lobireft"])
def test_every_type_trains_to_a_valid_adapter(llama, examples, kind):
    model, _ = llama
    result = train_adapter(model, examples, layers=[1, 3], intervention_type=kind, **SHORT)
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    validate(result.adapter, ModelShape(num_layers=4, hidden_size=128))


def test_one_sided_positions_store_shared_weights(llama, examples):
    model, _ = llama
    result = train_adapter(model, examples, layers=[2], **{**SHORT, "positions": "l3", "epochs": 1})
    assert result.adapter.config.share_weights is True
    assert {name.split(".")[2] for name in result.adapter.tensors} == {"0"}


def test_training_is_deterministic_for_a_seed_and_leaves_the_global_rng_alone(llama, examples):
    model, _ = llama
    rng_before = torch.random.get_rng_state()
    first, again, other = (train_adapter(model, examples, layers=[1], seed=seed, **SHORT) for seed in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert first.epoch_losses == again.epoch_losses
    for name, tensor in first.adapter.tensors.items():
        assert torch.equal(tensor, again.adapter.tensors[name])
    assert not torch.equal(first.adapter.tensors["layers.1.0.weight"], other.adapter.tensors["layers.1.0.weight"])


def test_progress_reports_every_step(llama, examples):
    model, _ = llama
    seen = []
    train_adapter(model, examples, layers=[0], progress=seen.append, **SHORT)
    assert [p.step for p in seen] == list(range(1, 7)) and seen[-1].total_steps == 6
    assert [p.epoch for p in seen] == [1, 1, 2, 2, 3, 3]


def test_bad_training_settings_are_rejected(llama, examples):
    model, _ = llama
    with pytest.raises(ValueError, match="layer 4 out of range"):
        train_adapter(model, examples, layers=[4])
    with pytest.raises(ValueError, match="unknown intervention type"):
        train_adapter(model, examples, layers=[0], intervention_type="lora")
    with pytest.raises(ValueError, match="invalid positions"):
        train_adapter(model, examples, layers=[0], positions="middle")


def test_chat_lines_use_the_chat_template_and_train(llama):
    model, tokenizer = llama
    chats = [
        [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "a bot"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Yes?"},
            {"role": "assistant", "content": "no"},
        ],
    ]
    examples = parse_examples(jsonl({"messages": m} for m in chats), tokenizer)
    assert list(examples[0].prompt_ids) == encode_chat(tokenizer, chats[0][:1], add_generation_prompt=True)
    assert tokenizer.decode(examples[0].prompt_ids) == "<|bos|><|user|>Who are you?\n<|assistant|>"
    assert list(examples[1].completion_ids) == [
        *tokenizer("no", add_special_tokens=False).input_ids,
        tokenizer.eos_token_id,
    ]
    result = train_adapter(model, examples, layers=ALL_LAYERS, **MEMORIZE)
    assert reproduced(model, result.adapter, examples, tokenizer.eos_token_id) == [True, True]


def test_prompt_lines_tokenize_as_the_server_does(llama, tmp_path):
    _, tokenizer = llama
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "Hi", "completion": "yo", "id": 7}\n\n')
    (example,) = load_examples(path, tokenizer)
    assert list(example.prompt_ids) == encode_prompt(tokenizer, "Hi")
    assert list(example.completion_ids) == [
        *tokenizer("yo", add_special_tokens=False).input_ids,
        tokenizer.eos_token_id,
    ]


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "no training examples"),
        (["", "  "], "no training examples"),
        (['{"prompt": "a", "completion": "b"}', "{not json"], "line 2: not valid JSON"),
        (['["a", "b"]'], "line 1: expected a JSON object"),
        (['{"prompt": "a"}'], "line 1: missing field 'completion'"),
        (['{"prompt": "a", "completion": 3}'], "line 1: 'completion' must be a string"),
        (['{"prompt": "", "completion": "b"}'], "line 1: 'prompt' is empty"),
        (['{"messages": "hi"}'], "line 1: 'messages' must be a list"),
        (
            ['{"messages": [{"role": "user", "content": "a"}, {"role": "user"}]}'],
            r"line 1: messages\[1\] must be an object",
        ),
        (
            ['{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}'],
            "line 1: the last message",
        ),
        (['{"messages": [], "prompt": "a", "completion": "b"}'], "line 1: give either"),
    ],
)
def test_bad_data_names_the_line(llama, lines, message):
    _, tokenizer = llama
    with pytest.raises(ValueError, match=message):
        parse_examples(lines, tokenizer, source="data.jsonl")


def test_parse_layers_one_reading_for_the_cli_the_admin_api_and_training():
    assert parse_layers("8;16", 24) == parse_layers("8,16", 24) == parse_layers("8,,16,", None) == (8, 16)
    assert parse_layers("all", 3) == (0, 1, 2)
    assert parse_layers(None) is None and parse_layers(" ") is None
    with pytest.raises(ValueError, match="invalid layers 'eight'"):
        parse_layers("eight", 24)
    with pytest.raises(ValueError, match='"all" needs the model'):
        parse_layers("all")
    with pytest.raises(ValueError, match="names no layer"):
        parse_layers(",;", 24)


def run_cli(model_dir, data, *argv) -> int:
    """`reft-server train --model model_dir --data data --name greeter *argv`, in process."""
    parser = argparse.ArgumentParser(prog="reft-server train")
    add_train_arguments(parser)
    args = parser.parse_args(["--model", str(model_dir), "--data", str(data), "--name", "greeter", *map(str, argv)])
    return run_train(args)


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(jsonl({"prompt": p, "completion": c} for p, c in PAIRS)) + "\n")
    return path


def test_cli_writes_an_adapter_and_prints_a_summary(tiny_model_dir, pairs_file, tmp_path, capsys):
    out = tmp_path / "adapters" / "greeter.safetensors"
    model_dir = tiny_model_dir("llama")
    assert run_cli(model_dir, pairs_file, "--layers", "0;2", "--epochs", 2, "--out", out) == 0
    captured = capsys.readouterr()
    assert "step 2/2" in captured.err and "loss" in captured.err
    assert "trained 4,112 parameters" in captured.out
    assert "final loss" in captured.out and str(out) in captured.out
    adapter = AdapterFile.load(out)
    validate(adapter, ModelShape(num_layers=4, hidden_size=128))
    assert adapter.config.layers == (0, 2) and adapter.config.base_model == str(model_dir)


def test_cli_reports_bad_data_with_its_line(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    out = tmp_path / "x.safetensors"
    assert run_cli(tiny_model_dir("llama"), data, "--layers", "0", "--out", out) == 1
    assert "line 2: missing field 'completion'" in capsys.readouterr().err
    assert not out.exists()


def test_cli_publishes_to_the_store(tiny_model_dir, pairs_file, tmp_path, capsys):
    from server.adapters.store import AdapterStore

    store = tmp_path / "store"
    assert run_cli(tiny_model_dir("llama"), pairs_file, "--layers", "all", "--epochs", 1, "--store", store) == 0
    assert f"{store} as greeter@1" in capsys.readouterr().out
    version, payload = AdapterStore(store).read("greeter")
    assert version == 1
    validate(AdapterFile.from_bytes(payload), ModelShape(num_layers=4, hidden_size=128))


@pytest.mark.parametrize("kind", ["loreft", "noreft"])
def test_the_engine_serves_what_the_trainer_evaluates(llama, examples, tiny_model_dir, kind):
    """End to end: a trained adapter, loaded by the engine, gives the trainer's own evaluation tokens."""
    from server.adapters.materialize import materialize
    from tests.engine_utils import load_engine_model, make_core, run_core, seq

    model, tokenizer = llama
    result = train_adapter(model, examples, layers=ALL_LAYERS, intervention_type=kind, **MEMORIZE)
    prompts = [list(e.prompt_ids) for e in examples]
    evaluated = greedy_completions(
        model, result.adapter, prompts, max_new_tokens=24, eos_token_id=tokenizer.eos_token_id
    )
    served = materialize(AdapterFile.from_bytes(result.adapter.to_bytes()), name=kind)
    core = make_core(load_engine_model(tiny_model_dir("llama")), eos={tokenizer.eos_token_id})
    tokens = run_core(core, [(seq(str(i), p, served, max_new_tokens=24), i) for i, p in enumerate(prompts)])
    assert [tokens[str(i)] for i in range(len(prompts))] == evaluated
    assert evaluated == [list(e.completion_ids) for e in examples]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_loss_is_cross_entropy_on_completion_tokens_only(tiny_model_dir, family):
    """The trainer projects only completion-predicting positions onto the vocabulary; the loss must
    equal the plain cross-entropy over every completion token, taken from full logits."""
    path = tiny_model_dir(family)
    model, tokenizer = load_reference_model(path), AutoTokenizer.from_pretrained(path)
    batch = parse_examples(jsonl({"prompt": p, "completion": c} for p, c in PAIRS), tokenizer)
    with torch.no_grad():
        loss = _batch_loss(model, {}, batch, [[] for _ in batch], torch.device("cpu"))
        token_losses = []
        for example in batch:
            ids = torch.tensor([example.prompt_ids + example.completion_ids])
            logits = model(input_ids=ids).logits[0, len(example.prompt_ids) - 1 : -1]
            token_losses.append(
                torch.nn.functional.cross_entropy(logits, ids[0, len(example.prompt_ids) :], reduction="none")
            )
    torch.testing.assert_close(loss, torch.cat(token_losses).mean(), rtol=1e-5, atol=1e-5)
