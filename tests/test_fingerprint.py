"""The base-model fingerprint: stable across dtypes, different across checkpoints."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.adapters.fingerprint import FOREIGN, UNVERIFIED, VERIFIED, fingerprint_status, model_fingerprint
from server.models.tiny import build_tiny_model


def fingerprint_of(path, dtype=torch.float32) -> str:
    return model_fingerprint(AutoModelForCausalLM.from_pretrained(path, dtype=dtype))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_same_checkpoint_in_fp32_and_bf16_has_one_fingerprint(tiny_model_dir, family):
    path = tiny_model_dir(family)
    assert fingerprint_of(path) == fingerprint_of(path, torch.bfloat16)


def test_a_bf16_checkpoint_matches_in_every_dtype(tiny_model_dir, tmp_path):
    original = tiny_model_dir("llama")
    AutoModelForCausalLM.from_pretrained(original, dtype=torch.bfloat16).save_pretrained(tmp_path)
    fingerprints = {fingerprint_of(tmp_path, dtype) for dtype in (torch.float32, torch.bfloat16, torch.float16)}
    assert fingerprints == {fingerprint_of(original)}


def test_another_checkpoint_of_the_same_architecture_differs(tiny_model_dir, tmp_path):
    retrained = build_tiny_model("llama", tmp_path, seed=1)
    assert fingerprint_of(retrained) != fingerprint_of(tiny_model_dir("llama"))


def test_status():
    assert fingerprint_status("", "rfp1-a") == UNVERIFIED
    assert fingerprint_status("rfp1-a", "rfp1-a") == VERIFIED
    assert fingerprint_status("rfp1-b", "rfp1-a") == FOREIGN
