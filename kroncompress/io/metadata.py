"""The safetensors header metadata of a compressed folder's model.safetensors: which program and format
version wrote it, so a reader can tell a kroncompress file from a plain one and refuse a newer format
with a message instead of a shape error.

    {"format": "pt", "kroncompress_version": "0.1.0", "kroncompress_format": "1"}

`format: pt` is what transformers and safetensors expect of PyTorch weights. Safetensors metadata values
are strings, hence "1". Folders written before this metadata existed have only `format` and still load.
"""

from __future__ import annotations

import os
from pathlib import Path

FORMAT_VERSION = 1  # bump when a folder written now could not be read by an older kroncompress
VERSION_KEY = "kroncompress_version"
FORMAT_KEY = "kroncompress_format"


def weights_metadata() -> dict[str, str]:
    """The metadata `save_compressed` writes into model.safetensors."""
    from kroncompress import __version__

    return {"format": "pt", VERSION_KEY: __version__, FORMAT_KEY: str(FORMAT_VERSION)}


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of a safetensors file ({} when it has none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def check_weights_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Raise ValueError when `path` was written in a kroncompress format newer than this one reads (or
    names its format unreadably); a file without kroncompress metadata (older folders, plain
    transformers files) passes. Returns the metadata."""
    path = Path(path)
    metadata = read_metadata(path)
    value = metadata.get(FORMAT_KEY)
    if value is None:
        return metadata
    try:
        version = int(value)
    except ValueError:
        raise ValueError(f"{path}: metadata {FORMAT_KEY}={value!r} is not a format number; the file was edited "
                         f"or written by another program: save it again with kc.save_compressed") from None
    if version > FORMAT_VERSION:
        from kroncompress import __version__

        writer = metadata.get(VERSION_KEY, "a newer version")
        raise ValueError(f"{path}: written by kroncompress {writer} in folder format {version}; this kroncompress "
                         f"({__version__}) reads format {FORMAT_VERSION} and older: pip install -U kroncompress")
    return metadata
