"""A fingerprint of a base model checkpoint, recorded in every adapter trained on it.

An adapter trained on another checkpoint of the same architecture has the right shapes and
silently produces garbage; the fingerprint tells the checkpoints apart. It hashes the
architecture-defining config fields and a strided sample of a few fixed weight tensors. The
samples are rounded to bfloat16 and then to a few significant bits before hashing, so the same
checkpoint gives the same fingerprint whether it is loaded in fp32 or bf16, on CPU or GPU, or with
its layers spread over several devices (and in fp16 too when the checkpoint is stored in bf16; an
fp32 checkpoint loaded in fp16 loses bits the hash sees). It costs a few small gathers, once at load.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from server.reft.layers import decoder_layers

PREFIX = "rfp1-"  # the algorithm's version: a new scheme gets a new prefix
CACHE_ATTRIBUTE = "_reft_fingerprint"
CONFIG_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "head_dim",
    "vocab_size",
)
SAMPLES_PER_TENSOR = 256
SIGNIFICANT_BITS = 5  # coarser than bf16's 8, so a value rounded slightly differently rarely flips a bucket

FP16_SMALLEST_NORMAL = 2.0**-14

VERIFIED, UNVERIFIED, FOREIGN = FINGERPRINT_STATUSES = ("verified", "unverified", "foreign")


def model_fingerprint(model: nn.Module) -> str:
    """The fingerprint, computed once per loaded model. On a tensor-parallel shard sampling a weight
    gathers it from the whole group, so every rank must make the first call (the model loader does)."""
    cached = getattr(model, CACHE_ATTRIBUTE, None)
    if cached is None:
        digest = hashlib.sha256(json.dumps(_architecture(model.config), sort_keys=True).encode())
        for tensor in _sampled_tensors(model):
            digest.update(_quantised_sample(tensor).numpy().tobytes())
        cached = PREFIX + digest.hexdigest()[:24]
        setattr(model, CACHE_ATTRIBUTE, cached)
    return cached


def fingerprint_status(adapter_fingerprint: str, served_fingerprint: str) -> str:
    """verified (made for this checkpoint), unverified (no fingerprint recorded) or foreign."""
    if not adapter_fingerprint:
        return UNVERIFIED
    return VERIFIED if adapter_fingerprint == served_fingerprint else FOREIGN


def _architecture(config) -> dict:
    fields = {name: getattr(config, name, None) for name in CONFIG_FIELDS}
    return {name: value for name, value in fields.items() if isinstance(value, (int, str))}


def _sampled_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The input embedding and the first weight of the first, middle and last decoder layer."""
    layers = decoder_layers(model)
    chosen = [model.get_input_embeddings().weight]
    for index in sorted({0, len(layers) // 2, len(layers) - 1}):
        chosen.append(next(layers[index].parameters()))
    return chosen


def _quantised_sample(tensor: torch.Tensor) -> torch.Tensor:
    if isinstance(tensor, DTensor):  # a tensor-parallel shard: the whole weight, as one process holds it
        tensor = tensor.full_tensor()
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
    sample = flat[::step][:SAMPLES_PER_TENSOR].to("cpu", torch.bfloat16).float()
    # fp16 keeps fewer bits of these; without them a bf16 checkpoint matches in fp16 too
    sample[sample.abs() < FP16_SMALLEST_NORMAL] = 0.0
    mantissa, exponent = torch.frexp(sample)  # sample = mantissa * 2**exponent, 0.5 <= |mantissa| < 1
    scale = 2.0**SIGNIFICANT_BITS
    return torch.ldexp(torch.round(mantissa * scale) / scale, exponent).contiguous()
