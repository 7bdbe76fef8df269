"""What `load_model` tells about the model it loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelInfo:
    """Where a loaded model came from and what it is."""

    name_or_path: str
    source: str  # "local" (folder with weights), "config" (config.json only), "hub", "compressed"
    model_type: str
    model_class: str
    meta: bool = False  # True: parameters live on the meta device (shapes only)
    tokenizer: Any = None
    notes: list[str] = field(default_factory=list)

    @property
    def description(self) -> str:
        text = f"{self.model_class} ({self.model_type}) from {self.source} {self.name_or_path!r}"
        return text + ("; meta: shapes only" if self.meta else "")
