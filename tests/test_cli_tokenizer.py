"""`--tokenizer` on every command that tokenises text, and `--max-eval-examples` of the task commands.

Model folders here hold no tokenizer (as a folder converted from GGUF, or saved with only the model's
save_pretrained): the byte tokenizer (257 ids) comes from its own folder through --tokenizer.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from click.testing import CliRunner

from kroncompress.models import TOKENIZER_FILES
from kroncompress.tokenizers import byte_tokenizer
from test_tasks import NEGATIVE, POSITIVE

BYTE_IDS = 257  # the byte tokenizer: 256 bytes + EOS
FITS, TOO_SMALL = 260, 128  # embedding rows of a model the byte tokenizer fits / does not fit


def run(*args):
    from kroncompress.cli.main import cli

    return CliRunner(env={"COLUMNS": "220"}).invoke(cli, [str(a) for a in args])


def _gpt2(folder, vocab: int):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=vocab,
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def _bert(folder, vocab: int, head: bool = False):
    """A bare tiny BERT, or (head=True) one with a two-class head, as a fine-tuned teacher has."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64, pad_token_id=0, num_labels=2)
    (transformers.BertForSequenceClassification if head else transformers.BertModel)(config).save_pretrained(folder)
    return folder


def has_tokenizer(folder) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tokenizer-less model folders, the byte tokenizer's folder, LM text and a labelled task folder."""
    tmp = tmp_path_factory.mktemp("tokenizer")
    tokenizer = tmp / "byte-tokenizer"
    byte_tokenizer().save_pretrained(tokenizer)
    (tmp / "empty").mkdir()
    text = tmp / "text.txt"
    text.write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 40)
    task = tmp / "task"
    task.mkdir()
    rows = ["review,verdict"] + [f"{s},good" for s in POSITIVE] + [f"{s},bad" for s in NEGATIVE]
    (task / "train.csv").write_text("\n".join(rows) + "\n")
    (task / "dev.csv").write_text("\n".join(rows) + "\n")  # sorted by label: 8 good, then 8 bad
    folders = {"tmp": tmp, "tokenizer": tokenizer, "empty": tmp / "empty", "text": text, "task": task,
               "gpt2": _gpt2(tmp / "gpt2", FITS), "gpt2-small-vocab": _gpt2(tmp / "gpt2-small", TOO_SMALL),
               "bert": _bert(tmp / "bert", FITS), "bert-small-vocab": _bert(tmp / "bert-small", TOO_SMALL, head=True)}
    assert not any(has_tokenizer(folders[k]) for k in ("gpt2", "gpt2-small-vocab", "bert", "bert-small-vocab"))
    return folders


TASK = ["--data", "{task}", "--text-column", "review", "--label-column", "verdict", "--max-length", "24"]

# (command, model, --tokenizer, extra args): each runs to completion with the given tokenizer
WORKS = {
    "eval": ("eval", "gpt2", ["--data", "{text}", "--block-size", "32", "--json"]),
    "compress (distil, calibrate)": ("compress", "gpt2", ["--recipe", "kn-gpt2", "--data", "{text}", "--max-steps", "1",
                                                          "--calibration-data", "{text}", "--calibration-tokens", "256",
                                                          "--output", "{out}"]),
    "finetune": ("finetune", "bert", [*TASK, "--max-steps", "2", "--batch-size", "8", "--output", "{out}"]),
}

# (command, model, extra args) with a tokenizer that does not fit, and with none at all
REFUSED = {
    "eval": ("eval", ["--data", "{text}"]),
    "compress": ("compress", ["--recipe", "kn-gpt2", "--data", "{text}", "--max-steps", "1", "--output", "{out}"]),
    "finetune": ("finetune", [*TASK, "--max-steps", "1", "--output", "{out}"]),
    "compress-task": ("compress-task", ["--recipe", "kron-task", *TASK, "--output", "{out}"]),
}
LM = {"eval", "compress"}


def _args(args, files, out):
    return [a.format(out=out, **{k: v for k, v in files.items()}) for a in args]


@pytest.mark.parametrize("case", list(WORKS))
def test_a_given_tokenizer_stands_in_for_the_missing_one(case, files, tmp_path):
    command, model, args = WORKS[case]
    out = tmp_path / "out"
    result = run(command, files[model], *_args(args, files, out), "--tokenizer", files["tokenizer"])
    assert result.exit_code == 0, result.output
    if command == "eval":
        assert json.loads(result.stdout)["tokens"] > 0
        return
    assert has_tokenizer(out)  # the output folder is self-contained: it carries the tokenizer it was run with
    saved = transformers.AutoTokenizer.from_pretrained(out)
    assert saved("To be")["input_ids"] == byte_tokenizer()("To be")["input_ids"]
    if command == "compress":
        report = json.loads((out / "report.json").read_text())
        assert report["tokenizer"] == str(files["tokenizer"]) and report["distill"]["steps"] == 1
        again = run("eval", out, "--data", files["text"], "--block-size", "32", "--json")  # no --tokenizer needed now
        assert again.exit_code == 0, again.output


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_tokenizer_that_does_not_fit_the_vocabulary_is_one_error_naming_both(case, files, tmp_path):
    command, args = REFUSED[case]
    model = files["gpt2-small-vocab" if command in LM else "bert-small-vocab"]
    out = tmp_path / "out"
    result = run(command, model, *_args(args, files, out), "--tokenizer", files["tokenizer"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for words in (f"tokenizer {str(files['tokenizer'])!r}", f"model {str(model)!r}", f"{BYTE_IDS} tokens",
                  f"only {TOO_SMALL} embedding rows"):
        assert words in lines[0], lines[0]
    assert not (out / "config.json").exists()


@pytest.mark.parametrize("case", [c for c in REFUSED if c != "compress-task"])  # that one needs a teacher: below
def test_a_missing_tokenizer_error_names_the_tokenizer_option(case, files, tmp_path):
    command, args = REFUSED[case]
    out = tmp_path / "out"
    result = run(command, files["gpt2" if command in LM else "bert"], *_args(args, files, out))
    assert result.exit_code == 2, result.output
    assert "error: " in result.output and "tokenizer" in result.output and "--tokenizer" in result.output, result.output


@pytest.mark.parametrize("value, words", [
    ("{tmp}/nowhere", "does not exist"),
    ("{empty}", "not a folder holding tokenizer files"),
    ("{text}", "not a folder holding tokenizer files"),
])
@pytest.mark.parametrize("command", ["eval", "compress"])
def test_a_bad_tokenizer_value_fails_before_the_model_loads(command, value, words, files, tmp_path):
    args = {"eval": ["--data", "{text}"], "compress": ["--recipe", "kn-gpt2", "--output", "{out}"]}[command]
    result = run(command, files["gpt2"], *_args(args, files, tmp_path / "out"), "--tokenizer", value.format(**files))
    assert result.exit_code == 2 and "--tokenizer" in result.output and words in result.output, result.output
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def teacher(files):
    """A BERT fine-tuned on the toy task, its tokenizer then removed (as a folder converted from GGUF)."""
    folder = files["tmp"] / "teacher"
    result = run("finetune", files["bert"], *_args(TASK, files, None), "--max-steps", "2", "--batch-size", "8",
                 "--output", folder, "--tokenizer", files["tokenizer"])
    assert result.exit_code == 0, result.output
    for name in folder.iterdir():
        if name.name in TOKENIZER_FILES or name.name == "special_tokens_map.json":
            name.unlink()
    return folder


@pytest.mark.parametrize("cap, scored", [(None, 16), (5, 5), (16, 16), (100, 16)])
def test_compress_task_caps_the_evaluation_examples_and_records_it(cap, scored, teacher, files, tmp_path):
    out = tmp_path / "out"
    flags = ["--max-eval-examples", str(cap)] if cap else []
    result = run("compress-task", teacher, "--recipe", "kron-task", "--data", files["task"], "--max-steps", "1",
                 "--output", out, "--tokenizer", files["tokenizer"], *flags)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["max_eval_examples"] == cap and report["eval_examples_available"] == {"validation": 16}
    assert report["examples"]["validation"] == scored and report["examples"]["train"] == 16
    for stage in ("teacher", "compressed", "distilled"):
        assert report["scores"][stage]["examples"] == {"validation": scored}
    assert (report["eval_sample"] is None) == (cap is None)
    assert report["tokenizer"] == str(files["tokenizer"]) and has_tokenizer(out)


def test_compress_task_without_a_tokenizer_names_the_option(teacher, files, tmp_path):
    result = run("compress-task", teacher, "--recipe", "kron-task", "--data", files["task"], "--output", tmp_path / "out")
    assert result.exit_code == 2 and "--tokenizer" in result.output, result.output


def test_the_evaluation_sample_is_seeded_ordered_and_leaves_training_alone():
    from kroncompress.tasks import cap_eval_splits, load_task

    rows = {"train": [{"sentence": s, "label": "pos"} for s in POSITIVE] + [{"sentence": s, "label": "neg"} for s in NEGATIVE],
            "validation": [{"sentence": s, "label": "pos"} for s in POSITIVE] + [{"sentence": s, "label": "neg"} for s in NEGATIVE]}
    data = load_task({"labels": ["neg", "pos"]}, rows)
    first, second = cap_eval_splits(data, 6), cap_eval_splits(data, 6)
    kept = first.splits["validation"].texts
    assert kept == second.splits["validation"].texts and len(kept) == 6  # the same examples every time
    order = data.splits["validation"].texts
    assert [order.index(t) for t in kept] == sorted(order.index(t) for t in kept)  # in the split's order
    assert first.splits["train"].texts == data.splits["train"].texts
    assert set(first.splits["validation"].labels) == {0, 1}  # a sample, not the first 6 (all "pos" here)
    assert cap_eval_splits(data, None) is data
    with pytest.raises(ValueError, match="max_eval_examples must be an integer >= 1"):
        cap_eval_splits(data, 0)


def test_the_library_takes_a_tokenizer_folder_too(files):
    from kroncompress.models import load_model

    model, info = load_model(files["gpt2"], tokenizer=files["tokenizer"])
    assert len(info.tokenizer) == BYTE_IDS and any("tokenizer:" in note for note in info.notes)
    with pytest.raises(ValueError, match=f"{BYTE_IDS} tokens .* only {TOO_SMALL} embedding rows"):
        load_model(files["gpt2-small-vocab"], tokenizer=files["tokenizer"])
