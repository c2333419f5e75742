"""The one map from dtype names to torch dtypes, for every name a config or a CLI flag uses:
`fp32`/`float32`, `fp16`/`float16`, `bf16`/`bfloat16`, and Accelerate's mixed-precision `no`
(full precision). `keep` (a CLI's "leave the stored dtype") maps to None."""
from __future__ import annotations

from typing import Optional

import torch

DTYPES: dict[str, Optional[torch.dtype]] = {
    "fp32": torch.float32, "float32": torch.float32, "no": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "keep": None,
}


def torch_dtype(name: str) -> Optional[torch.dtype]:
    """The torch dtype of a name in DTYPES (None for `keep`); a ValueError naming the choices otherwise."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}") from None


def autocast_dtype(mixed_precision: str) -> Optional[torch.dtype]:
    """The half-precision dtype of Accelerate's mixed_precision setting; None for `no` (full precision)."""
    return None if mixed_precision == "no" else torch_dtype(mixed_precision)
