"""The default demo on the real SmolLM2-135M-Instruct, converted from the installed wheel and given its
four style adapters once per session (the `smollm2_demo` fixture, as a first `reft-server serve` does):
the shipped adapters are the ones this code's recipe makes for this model, the styles carry over to
questions no adapter saw, every request of a mixed batch equals itself served alone and the reference
path, through the engine and over HTTP, with the real tokenizer and chat template; and the recipe,
trained anew on one style, still carries it, and its adapter reloaded from a store reproduces the
trainer's own evaluation."""

import itertools
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.adapters.fingerprint import model_fingerprint
from server.adapters.format import AdapterFile
from server.adapters.materialize import materialize
from server.adapters.store import AdapterStore
from server.demo_smollm2 import RECORD_KEY, SHIPPED_DIR, demo_record, shipped_style, style_examples, train_style
from server.demo_styles import ANSWERS, HELD_OUT_QUESTIONS, STYLES, style_answers
from server.reft.reference import reference_generate
from server.smollm2 import SMOLLM2_MODEL_NAME
from server.tokenization import encode_chat
from server.training.evaluate import greedy_completions, reproduced
from tests.api_utils import running_app
from tests.conftest import SMOLLM2_DEMO_TIMEOUT, load_reference_model
from tests.engine_utils import load_engine_model, make_core, run_core, seq
from tests.style_marks import MARKS

pytestmark = pytest.mark.timeout(SMOLLM2_DEMO_TIMEOUT)
MAX_NEW_TOKENS = 24
MODELS = (None, *STYLES)  # None: the base model
ENGINE = dict(num_blocks=640, block_size=16, max_batched_tokens=256, max_num_seqs=64, max_model_len=256)


def stored_adapter_file(store_dir, name: str) -> AdapterFile:
    _, data = AdapterStore(store_dir).read(name)
    return AdapterFile.from_bytes(data)


@pytest.fixture(scope="module")
def demo(smollm2_demo):
    """(prepared demo, store directory, tokenizer, {style: Adapter as served from the store})."""
    prepared, _, store_dir = smollm2_demo
    adapters = {name: materialize(stored_adapter_file(store_dir, name), name=name) for name in STYLES}
    return prepared, store_dir, AutoTokenizer.from_pretrained(prepared.model_dir), adapters


@pytest.fixture(scope="module")
def engine_model(demo):
    return load_engine_model(demo[0].model_dir)


@pytest.fixture(scope="module")
def reference_model(demo):
    return load_reference_model(demo[0].model_dir)


def chat_ids(tokenizer, question: str) -> list[int]:
    return encode_chat(tokenizer, [{"role": "user", "content": question}])


@pytest.fixture(scope="module")
def held_out_mixed(demo, engine_model):
    """Every held-out question put to the base model and to each adapter, all in one mixed batch with
    staggered arrivals: (the engine core, {(adapter name or None, question): generated ids})."""
    _, _, tokenizer, adapters = demo
    core = make_core(engine_model, eos={tokenizer.eos_token_id}, **ENGINE)
    keys, requests = {}, []
    for i, (name, question) in enumerate(itertools.product(MODELS, HELD_OUT_QUESTIONS)):
        keys[f"r{i}"] = (name, question)
        sequence = seq(f"r{i}", chat_ids(tokenizer, question), adapters.get(name), max_new_tokens=MAX_NEW_TOKENS)
        requests.append((sequence, i % 7))
    generated = run_core(core, requests)
    return core, {keys[rid]: tokens for rid, tokens in generated.items()}


def test_held_out_questions_are_not_trained_on():
    trained = {question.lower() for question, *_ in ANSWERS}
    assert len(trained) == len(ANSWERS) and not trained & {q.lower() for q in HELD_OUT_QUESTIONS}


@pytest.mark.parametrize("style", STYLES)
def test_every_training_answer_carries_its_style(style):
    unmarked = [answer for _, answer in style_answers(style) if not MARKS[style](answer)]
    assert not unmarked


def test_the_demo_serves_the_shipped_adapters_which_this_codes_recipe_made_for_this_model(demo, reference_model):
    prepared, store_dir, tokenizer, _ = demo
    for style in STYLES:
        shipped = shipped_style(style, tokenizer)
        assert shipped is not None, f"{SHIPPED_DIR} is stale: regenerate it with `python -m server.demo_smollm2`"
        config = AdapterFile.from_bytes(shipped).config
        assert config.provenance[RECORD_KEY] == demo_record(style, style_examples(tokenizer, style))
        assert config.base_model_fingerprint == model_fingerprint(reference_model)
        assert AdapterStore(store_dir).read(style)[1] == shipped
    assert not prepared.trained  # nothing was trained: each was shipped, current, and for this model


def replies_of(held_out_mixed, name: str | None) -> dict[str, list[int]]:
    """{held-out question: the ids generated for it} by adapter `name` (None: the base model) in the mixed batch."""
    return {question: held_out_mixed[1][name, question] for question in HELD_OUT_QUESTIONS}


def assert_steered(tokenizer, steered: dict[str, list[int]], base: dict[str, list[int]], style: str) -> None:
    """At least 3/4 of the held-out replies carry `style`'s mark, and at most 1/4 of the base model's."""

    def marked(replies):
        texts = [tokenizer.decode(replies[question], skip_special_tokens=True) for question in HELD_OUT_QUESTIONS]
        return sum(MARKS[style](text) for text in texts), texts

    (steered_marks, steered_texts), (base_marks, base_texts) = marked(steered), marked(base)
    questions = len(HELD_OUT_QUESTIONS)
    assert steered_marks >= 0.75 * questions and base_marks <= 0.25 * questions, (steered_texts, base_texts)


@pytest.mark.parametrize("style", STYLES)
def test_each_adapter_carries_its_style_to_held_out_questions(demo, held_out_mixed, style):
    assert_steered(demo[2], replies_of(held_out_mixed, style), replies_of(held_out_mixed, None), style)


def test_mixed_batch_equals_alone_and_reference(demo, held_out_mixed, reference_model):
    _, _, tokenizer, adapters = demo
    core, mixed = held_out_mixed
    assert core.kv.num_free_blocks == core.kv.num_blocks
    for name, question in itertools.product(MODELS, HELD_OUT_QUESTIONS[:3]):
        prompt, adapter = chat_ids(tokenizer, question), adapters.get(name)
        core.kv.reset_prefix_cache()  # alone means computed alone, not from the mixed run's blocks
        alone = run_core(core, [(seq("alone", prompt, adapter, max_new_tokens=MAX_NEW_TOKENS), 0)])["alone"]
        reference = reference_generate(
            reference_model, prompt, adapter, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=tokenizer.eos_token_id
        )
        assert mixed[name, question] == alone == reference, (name, question)


def test_concurrent_http_requests_equal_the_reference(demo, reference_model):
    prepared, store_dir, tokenizer, adapters = demo
    cases = list(zip(MODELS * 2, HELD_OUT_QUESTIONS[2:12], strict=True))

    def ask(client, name, question):
        body = {
            "model": name or SMOLLM2_MODEL_NAME,
            "messages": [{"role": "user", "content": question}],
            "temperature": 0,
            "max_tokens": MAX_NEW_TOKENS,
        }
        return client.post("/v1/chat/completions", json=body)

    settings = dict(served_model_name=SMOLLM2_MODEL_NAME, kv_cache_memory="64MiB", max_num_seqs=16)
    with running_app(prepared.model_dir, store_dir, **settings) as client, ThreadPoolExecutor(len(cases)) as pool:
        responses = list(pool.map(lambda case: ask(client, *case), cases))
    for (name, question), response in zip(cases, responses, strict=True):
        assert response.status_code == 200, response.text
        reference = reference_generate(
            reference_model,
            chat_ids(tokenizer, question),
            adapters.get(name),
            max_new_tokens=MAX_NEW_TOKENS,
            eos_token_id=tokenizer.eos_token_id,
        )
        expected = tokenizer.decode(reference, skip_special_tokens=True)
        assert response.json()["choices"][0]["message"]["content"] == expected, (name, question)


@pytest.fixture(scope="module")
def trained_pirate(demo):
    """The pirate adapter trained anew by the demo's recipe, as a first start without a shipped copy does."""
    prepared, _, tokenizer, _ = demo
    model = AutoModelForCausalLM.from_pretrained(prepared.model_dir, dtype=torch.float32)
    return train_style(model, tokenizer, "pirate").adapter  # as the trainer returned it, never written


def test_the_recipe_trained_anew_still_carries_its_style(demo, engine_model, held_out_mixed, trained_pirate):
    tokenizer = demo[2]
    adapter = materialize(AdapterFile.from_bytes(trained_pirate.to_bytes()), name="pirate-anew")
    core = make_core(engine_model, eos={tokenizer.eos_token_id}, **ENGINE)
    requests = [
        (seq(f"q{i}", chat_ids(tokenizer, question), adapter, max_new_tokens=MAX_NEW_TOKENS), 0)
        for i, question in enumerate(HELD_OUT_QUESTIONS)
    ]
    served = run_core(core, requests)
    steered = {question: served[f"q{i}"] for i, question in enumerate(HELD_OUT_QUESTIONS)}
    assert_steered(tokenizer, steered, replies_of(held_out_mixed, None), "pirate")


def test_adapter_reloaded_from_a_store_reproduces_the_trainers_evaluation(
    demo, reference_model, engine_model, trained_pirate, tmp_path
):
    _, _, tokenizer, _ = demo
    store = AdapterStore(tmp_path / "store")
    store.publish("pirate", trained_pirate.to_bytes())
    stored = stored_adapter_file(tmp_path / "store", "pirate")
    examples = style_examples(tokenizer, "pirate")[:4]
    eos = tokenizer.eos_token_id
    assert reproduced(reference_model, stored, examples, eos) == reproduced(
        reference_model, trained_pirate, examples, eos
    )
    prompts = [example.prompt_ids for example in examples]
    expected = greedy_completions(
        reference_model, trained_pirate, prompts, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos
    )
    core = make_core(engine_model, eos={eos}, **ENGINE)
    served_adapter = materialize(stored, name="pirate")
    requests = [(seq(f"p{i}", p, served_adapter, max_new_tokens=MAX_NEW_TOKENS), 0) for i, p in enumerate(prompts)]
    served = run_core(core, requests)
    assert [served[f"p{i}"] for i in range(len(prompts))] == expected
