"""The floating-point dtypes the server knows by name: for adapter tensors and for the base model."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
