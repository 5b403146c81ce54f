"""Structured outputs in the engine: a request held to a grammar (JSON schema, regex, choices) draws
only what the grammar allows and ends when it is complete, token for token as the slow reference that
masks each greedy step with a matcher of its own; next to plain and adapter requests, which it changes
in nothing, with async scheduling as without."""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import llguidance
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from server.engine.grammar import MAX_GRAMMAR_CHARS, Grammars, bounded
from server.engine.sequence import FinishReason
from server.reft.reference import reference_generate
from tests.conftest import load_reference_model
from tests.engine_utils import load_engine_model, make_core, prompt, random_adapter, run_core, seq

EOS = 2
ANSWER = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}
GRAMMARS = {
    "schema": llguidance.LLMatcher.grammar_from_json_schema(json.dumps({**ANSWER, "additionalProperties": False})),
    "regex": llguidance.LLMatcher.grammar_from_regex("[0-9]{2,4}"),
    "choice": llguidance.grammar_from("lark", 'start: "red" | "green" | "blue, \\"dark\\""'),
}


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    """(engine model, reference model, tokenizer, the engine's Grammars) of the tiny Llama."""
    directory = tiny_model_dir("llama")
    model = load_engine_model(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return model, load_reference_model(directory), tokenizer, Grammars(tokenizer, model.config.vocab_size, {EOS})


class ReferenceGrammar:
    """The reference's constraint: a matcher of its own, its mask read whole and unpacked on the host."""

    def __init__(self, tokenizer, grammar: str, vocab: int):
        self.matcher = llguidance.LLMatcher(
            llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=EOS), grammar
        )
        self.vocab = vocab

    def allowed(self) -> torch.Tensor:
        words = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint32)
        bits = [(int(words[t // 32]) >> (t % 32)) & 1 for t in range(self.vocab)]
        return torch.tensor(bits, dtype=torch.bool)

    def accept(self, token: int) -> bool:
        assert self.matcher.consume_token(token)
        return token == EOS and self.matcher.is_stopped()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_constrained_requests_in_a_mixed_batch_equal_the_reference(served, async_scheduling):
    model, reference_model, tokenizer, grammars = served
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    adapter = random_adapter("a", "loreft", (0, 2), 4, "f3+l3", hidden, seed=3)
    requests = [  # (id, prompt, adapter, grammar)
        *[(f"g-{name}", prompt(9 + i, i), adapter if i % 2 else None, name) for i, name in enumerate(GRAMMARS)],
        ("g-schema-2", prompt(30, 7), adapter, "schema"),
        ("plain", prompt(12, 8), None, None),
        ("plain-adapter", prompt(20, 9), adapter, None),
    ]
    core = make_core(model, eos={EOS}, grammars=grammars, max_batched_tokens=24, async_scheduling=async_scheduling)
    finished: dict = {}
    sequences = [seq(rid, p, a, max_new_tokens=48, grammar=GRAMMARS.get(name)) for rid, p, a, name in requests]
    tokens = run_core(core, [(s, i % 3) for i, s in enumerate(sequences)], finished=finished)
    for rid, prompt_ids, a, name in requests:
        constraint = ReferenceGrammar(tokenizer, GRAMMARS[name], vocab) if name else None
        expected = reference_generate(
            reference_model, prompt_ids, a, max_new_tokens=48, eos_token_id=EOS, constraint=constraint
        )
        assert tokens[rid] == expected, rid
        if name is not None and len(expected) < 48:  # complete: the grammar's EOS ended it
            assert expected[-1] == EOS and finished[rid][0] is FinishReason.STOP


def test_a_complete_grammar_ends_the_request_with_text_it_matches(served):
    model, _, tokenizer, grammars = served
    core = make_core(model, eos={EOS}, grammars=grammars)
    requests = [
        (seq(f"{name}-{i}", prompt(10, i), max_new_tokens=64, temperature=1.0, seed=i, grammar=g), 0)
        for name, g in GRAMMARS.items()
        for i in range(3)
    ]
    finished: dict = {}
    tokens = run_core(core, requests, finished=finished)
    for request_id, ids in tokens.items():
        text = tokenizer.decode([t for t in ids if t != EOS])
        if request_id.startswith("choice"):
            assert text in ("red", "green", 'blue, "dark"') and finished[request_id][0] is FinishReason.STOP
        elif request_id.startswith("regex"):
            assert text.isdigit() and 2 <= len(text) <= 4 and finished[request_id][0] is FinishReason.STOP
        elif finished[request_id][0] is FinishReason.STOP:  # a sampled JSON may run out of tokens first
            assert json.loads(text)["answer"] in ("yes", "no")


@pytest.mark.parametrize("sampling", [{"ignore_eos": True}, {"min_tokens": 30}])
def test_a_complete_grammar_ends_with_its_eos_even_where_eos_is_ignored_or_held(served, sampling):
    model, _, tokenizer, grammars = served
    core = make_core(model, eos={EOS}, grammars=grammars)
    finished: dict = {}
    request = seq("c", prompt(10, 1), max_new_tokens=40, grammar=GRAMMARS["choice"], **sampling)
    tokens = run_core(core, [(request, 0)], finished=finished)["c"]
    assert tokens[-1] == EOS and finished["c"][0] is FinishReason.STOP
    assert tokenizer.decode(tokens[:-1]) in ("red", "green", 'blue, "dark"')


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_grammar_no_text_completes_fails_the_request_instead_of_stopping_it_empty(served, async_scheduling):
    """llguidance validates `start: start` and a schema that is its own $ref, then gives up on the first mask,
    allowing EOS alone: that ended the request with "stop" and the empty text, which matches neither."""
    model, _, _, grammars = served
    core = make_core(model, eos={EOS}, grammars=grammars, async_scheduling=async_scheduling)
    hopeless = {
        "lark": llguidance.grammar_from("lark", "start: start"),
        "schema": llguidance.LLMatcher.grammar_from_json_schema('{"$ref": "#"}'),
    }
    finished: dict = {}
    requests = [
        (seq(name, prompt(6, i), max_new_tokens=8, min_tokens=4, grammar=g), 0)
        for i, (name, g) in enumerate(hopeless.items())
    ]
    requests.append((seq("fine", prompt(7, 5), max_new_tokens=8, grammar=GRAMMARS["regex"]), 0))
    run_core(core, requests, finished=finished)
    for name in hopeless:
        reason, error = finished[name]
        assert reason is FinishReason.ERROR and error.startswith("structured output: "), finished[name]
    assert finished["fine"][0] is FinishReason.STOP


def test_choices_of_one_grammar_compile_it_once_and_each_holds_a_matcher_of_its_own(served, monkeypatch):
    """Compiling takes the engine's thread: n choices, or a client's requests, share one compile."""
    import server.engine.grammar as grammar_module

    model, _, tokenizer, _ = served
    grammars = Grammars(tokenizer, model.config.vocab_size, {EOS})  # a cache of its own
    compiles = []
    compile_once = grammar_module.on_compile_stack
    monkeypatch.setattr(grammar_module, "on_compile_stack", lambda build: compiles.append(1) or compile_once(build))
    core = make_core(model, eos={EOS}, grammars=grammars)
    requests = [
        seq(f"c{i}", prompt(9, 3), max_new_tokens=40, temperature=1.0, seed=i, grammar=GRAMMARS["choice"])
        for i in range(6)
    ]
    finished: dict = {}
    tokens = run_core(core, [(request, 0) for request in requests], finished=finished)
    assert len(compiles) == 1 and len({id(request.grammar) for request in requests}) == 6
    texts = {tokenizer.decode(ids[:-1]) for ids in tokens.values()}
    assert texts <= {"red", "green", 'blue, "dark"'} and len(texts) > 1  # each choice went its own way
    assert all(reason is FinishReason.STOP for reason, _ in finished.values())


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_holds_the_eos_of_a_grammar_that_may_go_on_even_where_eos_is_ignored(served, ignore_eos):
    """EOS, the model's favourite (bias), is allowed after 2 digits: drawn, it ends the request even where EOS
    is ignored, so min_tokens holds it back there too, until the grammar may end."""
    model, _, tokenizer, grammars = served
    core = make_core(model, eos={EOS}, grammars=grammars)
    sampling = {"min_tokens": 10, "ignore_eos": ignore_eos, "logit_bias": ((EOS, 100.0),)}
    digits = llguidance.LLMatcher.grammar_from_regex("[0-9]{2,40}")
    request = seq("digits", prompt(8, 1), max_new_tokens=30, grammar=digits, **sampling)
    finished: dict = {}
    tokens = run_core(core, [(request, 0)], finished=finished)["digits"]
    assert len(tokens) == 11 and tokens[-1] == EOS and finished["digits"][0] is FinishReason.STOP
    assert tokenizer.decode(tokens[:-1]).isdigit()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_stop_token_the_grammar_requires_is_drawn_though_min_tokens_holds_it(served, async_scheduling):
    """min_tokens holds back the stop tokens, but where the grammar allows nothing else the grammar wins (with
    both, every logit was -inf and the request failed); the stop token then ends the request, as any does."""
    model, _, tokenizer, grammars = served
    stop = tokenizer.convert_tokens_to_ids("x")
    core = make_core(model, eos={EOS}, grammars=grammars, async_scheduling=async_scheduling)
    grammar = llguidance.grammar_from("lark", f'start: "12" <[{stop}]> "34"')
    request = seq("s", prompt(6, 3), max_new_tokens=20, grammar=grammar, min_tokens=10, stop_token_ids=(stop,))
    finished: dict = {}
    tokens = run_core(core, [(request, 0)], finished=finished)["s"]
    assert tokenizer.decode(tokens) == "12x" and finished["s"][0] is FinishReason.STOP, (tokens, finished)


def test_a_grammar_that_does_not_compile_fails_its_request_alone(served):
    model, reference_model, _, grammars = served
    core = make_core(model, eos={EOS}, grammars=grammars)
    bad = seq("bad", prompt(5, 0), grammar='{"grammars": [{"lark_grammar": "start: missing_rule"}]}')
    finished: dict = {}
    tokens = run_core(core, [(bad, 0), (seq("good", prompt(7, 1), max_new_tokens=6), 0)], finished=finished)
    assert finished["bad"][0] is FinishReason.ERROR and "structured output" in finished["bad"][1]
    assert tokens["good"] == reference_generate(reference_model, prompt(7, 1), max_new_tokens=6)


def test_the_engine_steps_the_others_while_a_grammar_compiles(served):
    """A grammar compiles off the engine's thread (0.2 s for a large schema): meanwhile the other requests
    go on, and the constrained one joins once it has compiled."""
    model, reference_model, tokenizer, _ = served
    grammars = Grammars(tokenizer, model.config.vocab_size, {EOS})
    compile_grammar, release = grammars._compile, threading.Event()
    grammars._compile = lambda grammar: release.wait(30) and compile_grammar(grammar)
    core = make_core(model, eos={EOS}, grammars=grammars)
    core.add(seq("held", prompt(9, 2), max_new_tokens=8, grammar=GRAMMARS["regex"]))
    core.add(seq("free", prompt(7, 1), max_new_tokens=6))
    outputs = [output for _ in range(12) for output in core.step()]
    assert [t for o in outputs if o.request_id == "free" for t in o.new_tokens] == reference_generate(
        reference_model, prompt(7, 1), max_new_tokens=6
    )
    assert not any(o.request_id == "held" for o in outputs) and core.only_compiling and core.load().waiting == 1
    release.set()
    tokens = run_core(core, [])
    constraint = ReferenceGrammar(tokenizer, GRAMMARS["regex"], model.config.vocab_size)
    expected = reference_generate(
        reference_model, prompt(9, 2), max_new_tokens=8, eos_token_id=EOS, constraint=constraint
    )
    assert tokens["held"] == expected


# a schema whose $refs nest 2000 objects deep (~110 KB) and a Lark grammar of 5000 rules each the next's only
# part (~60 KB): llguidance's recursive compile overflowed an 8 MiB thread stack on both, killing the process
DEEP_STRUCTURES = r"""
import json, sys
from transformers import AutoTokenizer
from server.api.schemas import GenerateRequest
from server.engine.grammar import Grammars

defs = {f"d{i}": {"type": "object", "properties": {"a": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(2000)}
schema = {"$defs": {**defs, "d2000": {"type": "integer"}}, "$ref": "#/$defs/d0"}
lark = "start: r0\n" + "\n".join(f"r{i}: r{i + 1}" for i in range(5000)) + '\nr5000: "z"'
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
grammars = Grammars(tokenizer, len(tokenizer), {2})
for structure in ({"json": schema}, {"grammar": lark}):
    request = GenerateRequest.model_validate({"prompt": "x", "structured_outputs": structure})
    grammars.matcher(request.sampling(4, None).grammar)
print("compiled")
"""


def test_grammars_nested_past_a_threads_stack_compile_where_they_used_to_crash_the_process(tiny_model_dir):
    root = Path(__file__).resolve().parent.parent
    run = [sys.executable, "-c", DEEP_STRUCTURES, str(tiny_model_dir("llama"))]
    done = subprocess.run(run, cwd=root, capture_output=True, text=True, timeout=300)  # a crash must not take pytest
    assert done.returncode == 0 and done.stdout.strip() == "compiled", (done.returncode, done.stderr[-2000:])


def test_a_grammar_past_the_size_served_is_refused_before_it_compiles(served):
    model, _, _, grammars = served
    too_large = llguidance.LLMatcher.grammar_from_regex("a" * MAX_GRAMMAR_CHARS)
    with pytest.raises(ValueError, match="characters, more than"):
        bounded(too_large)
    core = make_core(model, eos={EOS}, grammars=grammars)
    finished: dict = {}
    run_core(core, [(seq("big", prompt(5, 0), grammar=too_large), 0)], finished=finished)
    assert finished["big"][0] is FinishReason.ERROR and "characters, more than" in finished["big"][1]


def test_choices_of_any_characters_compile_and_match_exactly_themselves(served):
    from server.api.structured_outputs import choice_grammar

    model, _, tokenizer, grammars = served
    choices = ["a\x7fb", "\x00", "\t\n", 'say "\\u0041"', "é😀", "\u2028", "/re/", "%"]
    grammar = choice_grammar(choices)  # DEL, raw in a Lark string, was a 400 "lexer error"
    for choice in choices:
        matcher = grammars.matcher(grammar)
        assert matcher.consume_tokens(tokenizer.encode(choice, add_special_tokens=False)), choice
        assert matcher.is_accepting() and matcher.consume_token(EOS), choice


def test_without_a_grammar_reader_structured_outputs_are_refused(served):
    model, _, _, _ = served
    core = make_core(model, eos={EOS})
    with pytest.raises(ValueError, match="structured outputs are not available"):
        core.add(seq("g", prompt(5, 0), grammar=GRAMMARS["regex"]))


# -- over HTTP ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["thread", "process"])
def client(request, tiny_model_dir, tmp_path_factory):
    """A server of the tiny Llama, its engine in a thread or a process of its own (grammars cross a pipe)."""
    from tests.api_utils import running_app

    store = tmp_path_factory.mktemp("store")
    with running_app(tiny_model_dir("llama"), store, engine_core=request.param, device="cpu") as client:
        yield client


def model_of(client) -> str:
    return client.get("/v1/models").json()["data"][0]["id"]


COLOURS = ["red", "green", 'blue, "dark"']


@pytest.mark.parametrize(
    "structure",
    [{"guided_choice": COLOURS}, {"structured_outputs": {"choice": COLOURS}}],
)
def test_completions_hold_the_text_to_the_choices(client, structure):
    body = {"model": model_of(client), "prompt": "Pick a colour:", "max_tokens": 32, "temperature": 1.0, "n": 4}
    out = client.post("/v1/completions", json={**body, **structure, "seed": 5}).json()
    assert all(c["text"] in COLOURS and c["finish_reason"] == "stop" for c in out["choices"]), out


def test_response_format_json_schema_gives_json_of_the_schema(client, monkeypatch):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    monkeypatch.setattr(client.app.state.reft.tokenizer, "chat_template", template)  # the tiny model has none
    schema = {**ANSWER, "additionalProperties": False}
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    body = {"model": model_of(client), "messages": [{"role": "user", "content": "yes?"}], "max_tokens": 64}
    body |= {"response_format": response_format, "temperature": 0}
    choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    if choice["finish_reason"] == "stop":  # greedy on random weights may pad with whitespace until max_tokens
        assert json.loads(choice["message"]["content"])["answer"] in ("yes", "no")
    else:
        assert choice["message"]["content"].lstrip().startswith("{")


def test_native_route_and_streaming_hold_to_a_regex(client):
    body = {"prompt": "digits:", "max_new_tokens": 16, "structured_outputs": {"regex": "[0-9]{2,4}"}}
    out = client.post("/v1/generate", json=body).json()
    assert out["text"].isdigit() and 2 <= len(out["text"]) <= 4 and out["finish_reason"] == "stop"
    from tests.api_utils import stream

    events = stream(client, "/v1/generate", {**body, "stream": True})[:-1]
    assert "".join(e["text"] for e in events) == out["text"]


def test_compact_json_leaves_a_model_no_whitespace_to_run_on_with(client):
    """vLLM's disable_any_whitespace: the random model, which pads flexible JSON with whitespace until its
    tokens run out, must now write the schema's instance and stop."""
    structure = {"json": {**ANSWER, "additionalProperties": False}, "disable_any_whitespace": True}
    body = {"prompt": "answer:", "max_new_tokens": 40, "structured_outputs": structure}
    out = client.post("/v1/generate", json=body).json()
    assert out["text"] in ('{"answer":"yes"}', '{"answer":"no"}') and out["finish_reason"] == "stop", out


@pytest.mark.parametrize(
    "structure, param",
    [
        ({"structured_outputs": {"regex": "("}}, "structured_outputs"),
        ({"guided_json": "{not json"}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, None),
        # refused only by a compile over the model's tokenizer (the engine's): were 500s from the engine
        ({"guided_grammar": "start: <|no_such_special_token|>"}, "structured_outputs"),
        ({"structured_outputs": {"grammar": "start: <[999999]>"}}, "structured_outputs"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/no"}}}},
            "response_format",
        ),
    ],
)
def test_a_structure_that_cannot_be_served_is_a_400(client, structure, param):
    body = {"model": model_of(client), "prompt": "x", "max_tokens": 4, **structure}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


@pytest.mark.parametrize("route", ["/v1/generate", "/v1/chat/completions"])
def test_a_grammar_only_the_tokenizer_refuses_is_a_400_on_every_route(client, route):
    if route == "/v1/generate":
        body = {"prompt": "x", "max_new_tokens": 4, "structured_outputs": {"grammar": "start: <[999999]>"}}
    else:
        body = {"model": model_of(client), "messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/no"}}}
    response = client.post(route, json=body)
    assert response.status_code == 400 and "structured output" in response.json()["error"]["message"], response.text


def test_a_grammar_compiles_off_the_event_loop_which_serves_other_requests_meanwhile(client):
    """A new grammar's compile (0.2 s for a 100 KB schema) is awaited, not waited for: held open here, the
    server answers other requests, then the structured request completes."""
    grammars = client.app.state.reft.grammars
    compile_grammar, release = grammars._compile, threading.Event()
    grammars._compile = lambda grammar: release.wait(30) and compile_grammar(grammar)
    body = {"prompt": "n:", "max_new_tokens": 8, "structured_outputs": {"regex": "[0-9]{3}-held"}}
    answer: dict = {}
    held = threading.Thread(target=lambda: answer.update(response=client.post("/v1/generate", json=body)))
    try:
        held.start()
        started = time.monotonic()
        assert (
            client.get("/v1/models").status_code == 200
            and client.post("/v1/generate", json={"prompt": "free", "max_new_tokens": 4}).status_code == 200
        )
        assert time.monotonic() - started < 10 and "response" not in answer
    finally:
        release.set()
        held.join(60)
        grammars._compile = compile_grammar
    response = answer["response"]
    assert response.status_code == 200 and response.json()["text"].endswith("-held"), response.text


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/generate"])
def test_a_null_guided_field_is_unset_and_an_empty_schema_or_regex_is_given(client, route):
    """As vLLM's: a null guided_* is unset (OpenAI's clients send null for unset), and any value that is not
    null is given, the empty schema (any JSON value) and the empty regex (the empty text) included."""
    if route == "/v1/completions":
        body, text = {"model": model_of(client), "prompt": "x", "max_tokens": 24}, lambda out: out["choices"][0]["text"]
    else:
        body, text = {"prompt": "x", "max_new_tokens": 24}, lambda out: out["text"]

    def post(**fields) -> dict:
        response = client.post(route, json={**body, **fields})
        assert response.status_code == 200, response.text
        return response.json()

    post(guided_json=None, guided_regex=None, guided_choice=None, guided_grammar=None)
    assert text(post(guided_json=None, guided_regex="[0-9]{3}")).isdigit()
    assert text(post(guided_regex=None, structured_outputs={"choice": ["yes"]})) == "yes"
    assert text(post(structured_outputs={"regex": ""})) == ""
    assert text(post(structured_outputs={"regex": "[ab]", "json_object": False})) in ("a", "b")
    post(structured_outputs={"json": {}})
