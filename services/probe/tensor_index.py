"""The view of one model file that identification works on (:class:`TensorIndex`); services.probe.tensors
and services.probe.gguf_file build it from safetensors/pickle and GGUF files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class TensorIndex:
    """Tensor name -> shape of one file, plus its string metadata.

    ``metadata`` is the safetensors ``__metadata__``, or for a pickle the top-level scalars
    (``global_step``, ``epoch``...) that sit next to its ``state_dict``.
    """

    path: Path
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str] = field(default_factory=dict)
    #: tensor name -> safetensors dtype (``BF16``, ``F8_E4M3``...), where the format says it
    dtypes: dict[str, str] = field(default_factory=dict)

    def shape(self, key: str) -> tuple[int, ...] | None:
        return self.shapes.get(key)

    def has_prefix(self, *prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in self.shapes)

    def has_fragment(self, *fragments: str) -> bool:
        return any(f in k for k in self.shapes for f in fragments)

    def describe(self) -> str:
        """A short account of what the file holds, for error messages."""
        prefixes = sorted({k.split(".", 1)[0] for k in self.shapes})
        shown = ", ".join(prefixes[:6]) + (", ..." if len(prefixes) > 6 else "")
        return f"{self.path.suffix or 'no suffix'} file with {len(self.shapes)} tensors (key prefixes: {shown})"
