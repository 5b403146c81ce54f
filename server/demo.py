"""The offline demo: a small Llama taught a toy chat language in seconds, and three ReFT adapters
trained on it, built once and cached on disk; adapters the store lacks are published into it.

The base model learns, from a generated corpus, to answer any chat message with a short line: most
often in a plain voice, sometimes as a pirate, in capitals or in French. Each demo adapter, trained
with `reft-server train`'s trainer, steers the frozen model into one voice for any message, which
shows one base model serving different behaviours per request. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.adapters.format import AdapterFile
from server.adapters.stores import open_store
from server.tiny_models import build_tiny_model
from server.tokenization import encode_chat
from server.training.data import parse_examples
from server.training.trainer import train_adapter

DEMO_VERSION = 2  # bump when the recipe changes: the cache is keyed by it
DEMO_MODEL_NAME = "reft-demo"
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
VOICE_WEIGHTS = {"plain": 7, "pirate": 1, "shouty": 1, "french": 1}  # the base model mostly speaks plainly
WORDS = (
    "the a of to and in is you that it he was for on are as with his they I at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up other "
    "about out many then them these so some her would make like him into time has look two more write go see no "
    "way could people my than first water been call who its now find long down day did get come made may part "
    "weather treasure ship food bread music city river book friend help email"
).split()

DEMO_BANNER = """
  reft-server is running the OFFLINE DEMO on {url}
  "{model}" is a tiny model taught a toy chat language: it answers any message with a short line,
  usually plainly. Adapters "pirate", "shouty" and "french" steer the same frozen model per request.

    curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{{"model": "pirate", "messages": [{{"role": "user", "content": "Where is the treasure?"}}]}}'

    python -c "from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='-');
    print(c.chat.completions.create(model='french', messages=[{{'role': 'user', 'content': 'Hi'}}]).choices[0].message.content)"

  Admin token for this session (uploads, deletes): {token}
  To serve a real model: reft-server serve --model <local path or hub id>   (see the README)
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


def _build_model(directory: Path) -> None:
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


def _train_voice(model_dir: Path, voice: str) -> AdapterFile:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rng = random.Random(voice)
    records = (json.dumps(_conversation(rng, voice)) for _ in range(ADAPTER_EXAMPLES))
    examples = parse_examples(records, tokenizer, source=f"demo {voice}")
    layers = list(range(model.config.num_hidden_layers))
    return train_adapter(model, examples, layers=layers, base_model=DEMO_MODEL_NAME, **ADAPTER_TRAINING).adapter


def prepare_demo(demo_dir: Path, store_root: str | Path, log: Callable[[str], None] = print) -> Path:
    """The demo model's directory, built if needed; the store gets any missing demo adapter."""
    demo_dir = Path(demo_dir)
    model_dir = demo_dir / f"model-v{DEMO_VERSION}"
    adapters_dir = demo_dir / f"adapters-v{DEMO_VERSION}"
    adapters_dir.mkdir(parents=True, exist_ok=True)
    if not (model_dir / "config.json").exists():
        started = time.perf_counter()
        log(f"building the demo model in {model_dir} (once) ...")
        _build_model(model_dir)
        log(f"built the demo model in {time.perf_counter() - started:.1f} s")
    store = open_store(store_root)
    for voice in (v for v in VOICES if v != "plain"):
        cached = adapters_dir / f"{voice}.safetensors"
        if not cached.exists():
            started = time.perf_counter()
            adapter = _train_voice(model_dir, voice)
            tmp = cached.with_name(f".{voice}.{os.getpid()}.part")
            adapter.save(tmp)
            tmp.replace(cached)
            log(f"trained demo adapter {voice!r} in {time.perf_counter() - started:.1f} s")
        if voice not in store.names():  # replicas starting together on one store: one publishes
            version = store.publish(voice, cached.read_bytes(), if_absent=True)
            log(f"demo adapter {voice}@{version} is in {store_root}")
    return model_dir
