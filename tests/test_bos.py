"""BOS-led blocks (kroncompress.distill.bos): with a tokenizer that adds BOS (Llama, Gemma), every training,
evaluation and calibration block opens with it; with one that adds none (GPT-2) nothing changes; the recipe's
`data.bos` overrides, and a bad value is refused naming the field."""

from __future__ import annotations

import random

import pytest
import torch

import kroncompress as kc
from kroncompress.distill.bos import block_bos, check_bos, tokenizer_bos
from kroncompress.distill.data import build_datasets, pack_blocks
from kroncompress.recipe import Recipe, RecipeError
from kroncompress.tokenizers import byte_tokenizer

from conftest import build_tiny

EOS, BOS = 256, 257
WORDS = "the of and to in is was for on that with as by at from his her an be it are this which".split()


def bos_tokenizer():
    """A byte tokenizer that adds BOS (id 257) in front of what it encodes, as Llama's and Gemma's do."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = byte_tokenizer().backend_tokenizer
    backend.add_special_tokens(["<bos>"])
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


TOKENIZERS = {"adds BOS": bos_tokenizer, "adds none (GPT-2 style)": byte_tokenizer}


def test_the_test_tokenizers_are_what_they_claim():
    assert bos_tokenizer()("ab")["input_ids"] == [BOS, 97, 98]
    assert bos_tokenizer()("ab", add_special_tokens=False)["input_ids"] == [97, 98]  # the stream has no BOS
    assert byte_tokenizer()("ab")["input_ids"] == [97, 98] and byte_tokenizer().bos_token_id == EOS


@pytest.mark.parametrize("tokenizer, setting, token_ids, expected", [
    ("adds BOS", "auto", False, BOS),
    ("adds BOS", False, False, None),
    ("adds BOS", True, False, BOS),
    ("adds BOS", "auto", True, None),  # ids given as data are used as they are under auto
    ("adds BOS", True, True, BOS),
    ("adds none (GPT-2 style)", "auto", False, None),
    ("adds none (GPT-2 style)", True, False, EOS),  # GPT-2's BOS is <|endoftext|>
])
def test_block_bos_follows_the_tokenizer_unless_told(tokenizer, setting, token_ids, expected):
    assert block_bos(setting, TOKENIZERS[tokenizer](), token_ids=token_ids) == expected


def test_gpt2s_tokenizer_adds_no_bos():
    from kroncompress.tokenizers import gpt2_tokenizer

    try:
        tokenizer = gpt2_tokenizer()
    except (OSError, ValueError) as exc:  # the packaged GPT-2 files are optional (see the Makefile)
        pytest.skip(f"no GPT-2 tokenizer files: {exc}")
    assert tokenizer_bos(tokenizer) is None


def test_bos_true_without_a_bos_token_is_refused():
    tokenizer = byte_tokenizer()
    tokenizer.bos_token = None
    with pytest.raises(ValueError, match="bos is true, but the tokenizer has no bos_token_id"):
        block_bos(True, tokenizer)


def _recipe_with_bos(value):
    return Recipe.from_dict({"version": 1, "name": "t", "distill": {"data": {"bos": value}},
                             "compress": [{"targets": ["role:mlp"], "strategy": "svd", "options": {"ratio": 2}}]})


@pytest.mark.parametrize("value", ["yes", "True", 1, 0, None, "auto "])
def test_a_bad_bos_value_is_refused_naming_the_field(value):
    with pytest.raises(ValueError, match=r"data: bos must be auto, true or false"):
        check_bos(value)
    if value is not None:  # null in a recipe means "the default"
        with pytest.raises(RecipeError, match=r"distill\.data\.bos: (must be one of auto, true, false|expected a string "
                                              r"or true/false)"):
            _recipe_with_bos(value)
        with pytest.raises(ValueError, match="bos must be auto, true or false"):
            build_datasets({"source": "shakespeare", "bos": value}, byte_tokenizer())


@pytest.mark.parametrize("value", ["auto", True, False])
def test_the_recipe_takes_each_bos_setting(value):
    recipe = _recipe_with_bos(value)
    assert recipe.distill.data.bos == value
    assert Recipe.from_dict(recipe.to_dict()).distill.data.bos == value


@pytest.mark.parametrize("block_size, bos, expected", [
    (4, None, [[0, 1, 2, 3], [4, 5, 6, 7]]),
    (4, 9, [[9, 0, 1, 2], [9, 3, 4, 5], [9, 6, 7, 8]]),
    (2, 9, [[9, i] for i in range(10)]),
])
def test_pack_blocks_opens_every_block_with_bos(block_size, bos, expected):
    assert pack_blocks(torch.arange(10), block_size, bos).tolist() == expected


def test_pack_blocks_needs_room_for_bos_and_a_token():
    with pytest.raises(ValueError, match=r"block_size must be >= 2 \(BOS and one token\)"):
        pack_blocks(torch.arange(10), 1, 9)


@pytest.mark.parametrize("tokenizer, setting, bos", [
    ("adds BOS", "auto", BOS), ("adds BOS", False, None), ("adds none (GPT-2 style)", "auto", None),
])
def test_built_blocks_are_the_stream_with_bos_in_front(tmp_path, tokenizer, setting, bos):
    text = tmp_path / "text.txt"
    text.write_text("abcdefghij" * 20)
    train, validation = build_datasets({"files": [str(text)], "block_size": 8, "validation_fraction": 0.25,
                                        "bos": setting}, TOKENIZERS[tokenizer](), cache_dir=tmp_path)
    blocks = torch.cat([train, validation])
    stream = torch.tensor(list(b"abcdefghij" * 20) + [EOS])
    assert blocks.shape[1] == 8
    if bos is None:
        assert sorted(map(tuple, blocks.tolist())) == sorted(map(tuple, pack_blocks(stream, 8).tolist()))
    else:
        assert (blocks[:, 0] == bos).all()
        assert sorted(map(tuple, blocks.tolist())) == sorted(map(tuple, pack_blocks(stream, 8, bos).tolist()))


@pytest.fixture(scope="module")
def tiny_llama():
    """A tiny Llama of the 258-id byte vocabulary (BOS 257)."""
    return build_tiny("llama", vocab_size=258, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)


@pytest.mark.parametrize("block_size, stride", [(8, 8), (8, 4), (8, 7), (2, 2)])
def test_bos_windows_score_every_id_once_with_bos_as_context(tiny_llama, block_size, stride):
    ids = torch.randint(0, 256, (37,), generator=torch.Generator().manual_seed(0))
    result = kc.perplexity(tiny_llama, ids, block_size=block_size, stride=stride, bos_token_id=BOS)
    assert result.tokens == len(ids) and result.stride == min(stride, block_size - 1)
    if stride >= block_size - 1:  # disjoint windows: the same as scoring BOS-led rows one by one
        rows = [torch.cat([torch.tensor([BOS]), chunk]) for chunk in ids.split(block_size - 1)]
        reference = kc.perplexity(tiny_llama, rows, block_size=block_size, stride=block_size)
        assert reference.tokens == result.tokens and reference.nll == result.nll


def test_windows_without_bos_are_unchanged(tiny_llama):
    ids = torch.randint(0, 256, (37,), generator=torch.Generator().manual_seed(0))
    result = kc.perplexity(tiny_llama, ids, block_size=8, stride=4)
    assert result.tokens == len(ids) - 1 and result.stride == 4


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("bos")
    folders = {}
    for index, (name, make) in enumerate(TOKENIZERS.items()):
        folders[name] = root / f"model-{index}"
        tiny_llama.save_pretrained(folders[name])
        make().save_pretrained(folders[name])
    rng = random.Random(0)
    text = root / "corpus.txt"
    text.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(60)))
    return folders, text


@pytest.mark.parametrize("tokenizer, setting, bos", [
    ("adds BOS", "auto", BOS), ("adds BOS", False, None), ("adds none (GPT-2 style)", "auto", None),
    ("adds none (GPT-2 style)", True, EOS),
])
def test_the_pipeline_trains_scores_and_calibrates_on_bos_led_blocks(llama_folder, tmp_path, monkeypatch, tokenizer,
                                                                     setting, bos):
    import kroncompress.calibration.collect
    import kroncompress.distill.trainer
    import kroncompress.evaluate

    folders, text = llama_folder
    seen: dict[str, list] = {"train": [], "calibration": [], "scored": []}
    real_distill, real_collect = kroncompress.distill.trainer.distill, kroncompress.calibration.collect.collect_statistics
    real_perplexity = kroncompress.evaluate.perplexity

    def distill(student, teacher, config, train, validation, **kwargs):
        seen["train"] += [train, validation]
        return real_distill(student, teacher, config, train, validation, **kwargs)

    def collect(model, blocks, *args, **kwargs):
        seen["calibration"].append(blocks)
        return real_collect(model, blocks, *args, **kwargs)

    def perplexity(model, data, **kwargs):
        if "progress" in kwargs:  # a stage's score (the training-time evaluations pass no progress)
            seen["scored"].append((data.numel(), kwargs.get("bos_token_id")))
        return real_perplexity(model, data, **kwargs)

    monkeypatch.setattr(kroncompress.distill.trainer, "distill", distill)
    monkeypatch.setattr(kroncompress.calibration.collect, "collect_statistics", collect)
    monkeypatch.setattr(kroncompress.evaluate, "perplexity", perplexity)
    recipe = Recipe.from_dict({
        "version": 1, "name": "t", "compress": [{"targets": ["role:mlp"], "strategy": "svd",
                                                 "options": {"ratio": 2, "init": "auto"}}],
        "calibration": {"tokens": 64, "block_size": 16},
        "distill": {"teacher": "original", "data": {"block_size": 16, "bos": setting},
                    "train": {"batch_size": 2, "grad_accum": 1}}})
    report = kc.run_pipeline(folders[tokenizer], recipe, tmp_path / "out", data=str(text), max_steps=1,
                             measure_speed=False, progress=False)
    assert seen["train"] and seen["calibration"] and set(report["perplexity"]) == {"teacher", "compressed", "distilled"}
    for what, blocks in [("train", seen["train"][0]), ("validation", seen["train"][1]),
                         *[("calibration", b) for b in seen["calibration"]]]:
        firsts = set(blocks[:, 0].tolist())
        assert firsts == {bos} if bos is not None else BOS not in firsts, (what, firsts, blocks.shape)
    assert [used for _, used in seen["scored"]] == [bos] * 3  # teacher, compressed, distilled
    # the held-out text is scored without its BOS column, every id once: BOS-led windows score the first id too
    for (ids, _), stage in zip(seen["scored"], ("teacher", "compressed", "distilled")):
        assert report["perplexity"][stage]["tokens"] == ids - (bos is None)
