"""transformers 5.24 renamed the KV cache argument and output field from `past_key_values` to
`cache` (the old names warn, and the argument goes away in 5.40). The HF paths that carry a cache
from one forward to the next (the reference generator, the benchmarks' baselines) speak both."""

from __future__ import annotations

import inspect


def cache_argument(model) -> str:
    """The name under which this model's forward (and generate) takes a KV cache."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(output):
    """The KV cache in a forward's output, under either name."""
    return output["cache"] if "cache" in output else output["past_key_values"]
