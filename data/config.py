"""The `data` config section."""
from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str = "builtin:tinyshakespeare.txt"  # a UTF-8 text file, or builtin:NAME for a corpus shipped here
    tokenizer: Literal["char", "byte"] = "char"
    val_fraction: float = 0.1  # the last fraction of the text is the validation split

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
