"""The default demo on the real SmolLM2-135M-Instruct, converted from the installed wheel and given its
four style adapters once per session (the `smollm2_demo` fixture, as a first `reft-server serve` does):
the styles carry over to questions no adapter saw, every request of a mixed batch equals itself
served alone and the reference path, through the engine and over HTTP, with the real tokenizer and
chat template, and an adapter reloaded from the store reproduces the trainer's own evaluation."""

import itertools
from concurrent.futures import ThreadPoolExecutor

import pytest
from transformers import AutoTokenizer

from server.adapters.format import AdapterFile
from server.adapters.materialize import materialize
from server.adapters.store import AdapterStore
from server.demo_smollm2 import style_examples
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


@pytest.mark.parametrize("style", STYLES)
def test_each_adapter_carries_its_style_to_held_out_questions(demo, held_out_mixed, style):
    tokenizer = demo[2]
    _, replies = held_out_mixed

    def marked(name):
        texts = [tokenizer.decode(replies[name, q], skip_special_tokens=True) for q in HELD_OUT_QUESTIONS]
        return sum(MARKS[style](text) for text in texts), texts

    steered, steered_texts = marked(style)
    base, base_texts = marked(None)
    assert steered >= 0.75 * len(HELD_OUT_QUESTIONS) and base <= 0.25 * len(HELD_OUT_QUESTIONS), (
        steered_texts,
        base_texts,
    )


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


def test_adapter_reloaded_from_the_store_reproduces_the_trainers_evaluation(demo, reference_model, engine_model):
    prepared, store_dir, tokenizer, adapters = demo
    trained = prepared.trained["pirate"].adapter  # as the trainer returned it, never written
    stored = stored_adapter_file(store_dir, "pirate")
    examples = style_examples(tokenizer, "pirate")[:4]
    eos = tokenizer.eos_token_id
    assert reproduced(reference_model, stored, examples, eos) == reproduced(reference_model, trained, examples, eos)
    prompts = [example.prompt_ids for example in examples]
    expected = greedy_completions(reference_model, trained, prompts, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos)
    core = make_core(engine_model, eos={eos}, **ENGINE)
    requests = [(seq(f"p{i}", p, adapters["pirate"], max_new_tokens=MAX_NEW_TOKENS), 0) for i, p in enumerate(prompts)]
    served = run_core(core, requests)
    assert [served[f"p{i}"] for i in range(len(prompts))] == expected
