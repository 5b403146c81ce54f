"""Structured-output benchmark: requests held to a JSON schema (the masks of llguidance, server/engine/grammar.py)
against the same requests unconstrained, measured in one run on one machine and printed as a ratio of
generated tokens per second, with the share of the constrained runs' time spent making and applying the
masks, and how many of the constrained outputs parse as instances of the schema. (Constrained requests end
when their JSON does, so the two runs' batches thin out differently: the mask share is the direct cost.)

The preset needs a real tokenizer (the default, `smollm2`, is the demo's SmolLM2-135M-Instruct: 49,152
tokens to mask per row and step).

    python bench/structured.py --preset smollm2 --requests 16 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import AutoTokenizer  # noqa: E402

from bench.common import add_model_arguments, load, machine, model_dir, stamp  # noqa: E402
from server.api.structured_outputs import json_schema_grammar  # noqa: E402
from server.engine.config import EngineConfig  # noqa: E402
from server.engine.core import EngineCore, serving_core  # noqa: E402
from server.engine.sampling_params import SamplingParams  # noqa: E402
from server.engine.sequence import FinishReason, Sequence  # noqa: E402
from server.tokenization import encode_chat  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 24},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}
PEOPLE = ["a pirate", "a baker in Lyon", "a retired astronaut", "a young chess player", "a beekeeper", "a poet"]


def prompts(tokenizer, count: int) -> list[list[int]]:
    """Chat prompts asking for a person as JSON, as a client of the chat route would send them."""
    ask = "Describe {} as a JSON object with name, age, city and hobbies."
    return [
        encode_chat(tokenizer, [{"role": "user", "content": ask.format(PEOPLE[i % len(PEOPLE)])}]) for i in range(count)
    ]


def run(core: EngineCore, prompt_ids: list[list[int]], sampling: SamplingParams) -> tuple[float, int, list[list[int]]]:
    """(seconds, tokens generated, each request's tokens) for every request at once."""
    core.kv.reset_prefix_cache()
    started = time.perf_counter()
    for index, ids in enumerate(prompt_ids):
        core.add(Sequence(str(index), ids, sampling))
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, FinishReason] = {}
    while core.has_work():
        for output in core.step():
            tokens.setdefault(output.request_id, []).extend(output.new_tokens)
            if output.finish_reason is not None:
                reasons[output.request_id] = output.finish_reason
    seconds = time.perf_counter() - started
    assert all(reason is not FinishReason.ERROR for reason in reasons.values()), reasons
    outputs = [tokens[str(i)] for i in range(len(prompt_ids))]
    return seconds, sum(map(len, outputs)), outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.set_defaults(preset="smollm2")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians reported")
    args = parser.parse_args()

    model = load(args)
    tokenizer = AutoTokenizer.from_pretrained(model_dir(args))
    config = EngineConfig(kv_cache_bytes=2**30, max_num_seqs=args.requests, max_batched_tokens=1024)
    core = serving_core(model, config, tokenizer)
    assert core.grammars is not None, "llguidance cannot read this preset's tokenizer"
    asks = prompts(tokenizer, args.requests)
    plain = SamplingParams(max_new_tokens=args.max_new_tokens)
    held = SamplingParams(max_new_tokens=args.max_new_tokens, grammar=json_schema_grammar(SCHEMA))
    run(core, asks, held)  # warm up every code path
    masking = TimedCalls(core.grammars, "constrain")
    rates: dict[str, list[float]] = {"plain": [], "held": []}
    shares = []
    for _ in range(args.rounds):
        for name, sampling in (("plain", plain), ("held", held)):
            masking.seconds = 0.0
            seconds, generated, outputs = run(core, asks, sampling)
            rates[name].append(generated / seconds)
        shares.append(masking.seconds / seconds)
    eos = core.eos_token_ids
    texts = [tokenizer.decode([t for t in output if t not in eos]) for output in outputs]
    valid = sum(_is_instance(text) for text in texts)
    plain_rate, held_rate = statistics.median(rates["plain"]), statistics.median(rates["held"])
    print(f"machine: {machine()}  preset: {args.preset}  {next(model.parameters()).dtype}  {stamp()}")
    print(
        f"{args.requests} chat requests at once, greedy, up to {args.max_new_tokens} tokens, "
        f"medians of {args.rounds} rounds"
    )
    print(
        f"generated tok/s: unconstrained {plain_rate:8.1f}, held to a JSON schema {held_rate:8.1f}  "
        f"ratio held/unconstrained = {held_rate / plain_rate:.3f}"
    )
    print(f"masks made and applied: {statistics.median(shares):.1%} of the held runs' time")
    print(f"held outputs that parse as instances of the schema: {valid}/{len(texts)}  e.g. {texts[0]!r}")


class TimedCalls:
    """Wraps `owner.name` to add up the seconds its calls take (in `seconds`)."""

    def __init__(self, owner, name: str):
        self.seconds, wrapped = 0.0, getattr(owner, name)

        def call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return wrapped(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        setattr(owner, name, call)


def _is_instance(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return set(value) == set(SCHEMA["required"]) and isinstance(value["age"], int)


if __name__ == "__main__":
    main()
