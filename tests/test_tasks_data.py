"""Task data and metrics: every source gives the same examples; bad columns / labels name themselves;
GLUE's metrics agree with their textbook definitions."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from kroncompress.tasks import GLUE_TASKS, compute_metrics, load_task, task_spec

ROWS = [
    {"sentence": "a fine film", "label": "pos"},
    {"sentence": "a dull film", "label": "neg"},
    {"sentence": "what a joy", "label": "pos"},
    {"sentence": "what a bore", "label": "neg"},
]
SPEC = {"name": "toy", "labels": ["neg", "pos"]}


def test_in_memory_rows_become_ids_in_label_order():
    data = load_task(SPEC, {"train": ROWS, "validation": ROWS[:2]})
    assert data.train.texts == [r["sentence"] for r in ROWS]
    assert data.train.labels == [1, 0, 1, 0]
    assert data.split("validation").labels == [1, 0]
    assert data.num_labels == 2 and data.train.pairs is None


def test_labels_are_read_from_the_training_split_when_not_given():
    data = load_task({"name": "toy"}, {"train": ROWS, "validation": ROWS})
    assert data.spec.labels == ["neg", "pos"]  # sorted names
    ints = [{"sentence": r["sentence"], "label": i % 3} for i, r in enumerate(ROWS)]
    assert load_task({"name": "toy"}, {"train": ints, "validation": ints}).spec.labels == ["0", "1", "2"]


def test_csv_tsv_jsonl_and_folder_sources_agree(tmp_path):
    pairs = [{"q": f"question {i}", "s": f"sentence {i}", "y": str(i % 2)} for i in range(8)]
    with (tmp_path / "train.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["q", "s", "y"])
        writer.writeheader()
        writer.writerows(pairs)
    folder = tmp_path / "glue"
    folder.mkdir()
    for name in ("train.tsv", "dev.tsv"):  # GLUE's own file names: dev is the validation split
        lines = ["q\ts\ty"] + [f"{r['q']}\t{r['s']}\t{r['y']}" for r in pairs]
        (folder / name).write_text("\n".join(lines) + "\n")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    spec = {"name": "pairs", "text": "q", "text_pair": "s", "label": "y"}
    from_folder = load_task(spec, folder)
    assert from_folder.train.pairs == [r["s"] for r in pairs]
    assert from_folder.split("validation").labels == [i % 2 for i in range(8)]
    # one file: a validation part held out by a hash of the row, the same every time and for every format
    from_csv, from_jsonl = load_task(spec, tmp_path / "train.csv", validation_fraction=0.4), load_task(
        spec, tmp_path / "train.jsonl", validation_fraction=0.4)
    assert len(from_csv.train) + len(from_csv.split("validation")) == 8
    assert from_csv.train.texts == load_task(spec, tmp_path / "train.csv", validation_fraction=0.4).train.texts
    assert sorted(from_jsonl.train.texts + from_jsonl.split("validation").texts) == sorted(r["q"] for r in pairs)


def test_load_from_disk_and_class_label_names(tmp_path):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    features = Features({"sentence": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    rows = {"sentence": ["good", "bad", "fine"], "label": [1, 0, 1]}
    DatasetDict({"train": Dataset.from_dict(rows, features=features),
                 "validation": Dataset.from_dict(rows, features=features)}).save_to_disk(str(tmp_path / "ds"))
    data = load_task("sst2", tmp_path / "ds")
    assert data.spec.labels == ["negative", "positive"] and data.train.labels == [1, 0, 1]


def test_missing_column_names_it_and_the_available_ones():
    with pytest.raises(ValueError, match=r"column 'text' \(task text\) not found .*'train'.*available columns: sentence, label"):
        load_task({"name": "toy", "text": "text"}, {"train": ROWS, "validation": ROWS})
    with pytest.raises(ValueError, match=r"column 'sentence2' \(task text_pair\)"):
        load_task({"name": "toy", "text_pair": "sentence2"}, {"train": ROWS, "validation": ROWS})


def test_unknown_label_names_it_and_the_task_labels():
    bad = ROWS + [{"sentence": "meh", "label": "neutral"}]
    with pytest.raises(ValueError, match=r"label 'neutral' in split 'validation' \(row 4\) is not one of the task's labels \(neg, pos"):
        load_task(SPEC, {"train": ROWS, "validation": bad})
    with pytest.raises(ValueError, match=r"label 'high' .* is not a number"):
        load_task({"name": "sts", "kind": "regression"}, {"train": [{"sentence": "x", "label": "high"}], "validation": ROWS})


def test_missing_split_and_bad_spec_fields_are_named():
    with pytest.raises(ValueError, match=r"no split 'validation'.*it has train"):
        load_task(SPEC, {"train": ROWS})
    with pytest.raises(ValueError, match=r"unknown field\(s\) 'colum'"):
        task_spec({"colum": "x"})
    with pytest.raises(ValueError, match=r"not a GLUE task"):
        task_spec("sst3")
    with pytest.raises(ValueError, match=r"metrics \['bleu'\] unknown"):
        task_spec({"metrics": ["bleu"]})


def test_glue_presets_match_glue():
    mnli = task_spec("glue/mnli")
    assert (mnli.text, mnli.text_pair, mnli.eval_splits) == ("premise", "hypothesis", ["validation_matched", "validation_mismatched"])
    assert task_spec("stsb").kind == "regression" and task_spec("stsb").metrics == ["pearson", "spearman"]
    assert task_spec("cola").metrics == ["matthews"] and task_spec("mrpc").metrics == ["f1", "accuracy"]
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}


def test_metrics_match_their_definitions():
    y = np.array([1, 1, 0, 0, 1, 0, 1, 1])
    p = np.array([1, 0, 0, 1, 1, 0, 1, 0])
    tp, tn = int(((p == 1) & (y == 1)).sum()), int(((p == 0) & (y == 0)).sum())
    fp, fn = int(((p == 1) & (y == 0)).sum()), int(((p == 0) & (y == 1)).sum())
    scores = compute_metrics(["accuracy", "f1", "matthews"], p, y)
    assert scores["accuracy"] == (tp + tn) / len(y)
    assert scores["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert scores["matthews"] == pytest.approx(mcc, abs=1e-12)
    assert scores["score"] == pytest.approx((scores["accuracy"] + scores["f1"] + scores["matthews"]) / 3, abs=1e-12)
    x = np.array([0.1, 0.5, 0.2, 0.9, 0.7])
    t = np.array([0.0, 1.0, 0.5, 2.0, 1.0])
    correlations = compute_metrics(["pearson", "spearman"], x, t)
    assert correlations["pearson"] == pytest.approx(np.corrcoef(x, t)[0, 1], abs=1e-12)
    ranks = lambda v: np.argsort(np.argsort(v)).astype(float)  # noqa: E731  (x has no ties; t ranked by hand, its tie averaged)
    assert correlations["spearman"] == pytest.approx(compute_metrics(["pearson"], ranks(x), [0, 2.5, 1, 4, 2.5])["pearson"], abs=1e-12)
    assert compute_metrics(["pearson"], [1.0, 1.0, 1.0], [0.0, 1.0, 2.0])["pearson"] == 0.0  # a collapsed model


def test_three_class_f1_is_the_macro_average():
    y, p = [0, 1, 2, 2], [0, 2, 2, 1]
    per_class = [1.0, 0.0, 0.5]  # F1 of classes 0, 1, 2
    assert compute_metrics(["f1"], p, y)["f1"] == pytest.approx(sum(per_class) / 3, abs=1e-12)


@pytest.mark.parametrize("classes, n, seed", [(2, 7, 0), (2, 200, 1), (3, 50, 2), (5, 300, 3), (2, 40, 4)])
def test_metrics_agree_with_scikit_learn_and_scipy(classes, n, seed):
    """The numpy metrics against the libraries GLUE's scores are usually computed with (dev extra)."""
    skm = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    p = np.where(rng.random(n) < 0.6, y, rng.integers(0, classes, n))
    scores = compute_metrics(["accuracy", "f1", "matthews"], p, y, num_labels=classes)
    average = "binary" if classes == 2 else "macro"
    assert scores["accuracy"] == pytest.approx(skm.accuracy_score(y, p), abs=1e-12)
    assert scores["f1"] == pytest.approx(skm.f1_score(y, p, average=average, zero_division=0.0), abs=1e-12)
    assert scores["matthews"] == pytest.approx(skm.matthews_corrcoef(y, p), abs=1e-12)
    x = np.round(rng.normal(size=n), 1)  # rounded: ties, which Spearman ranks by their average
    t = np.round(x + rng.normal(size=n), 1)
    scores = compute_metrics(["pearson", "spearman"], x, t)
    assert scores["pearson"] == pytest.approx(stats.pearsonr(x, t)[0], abs=1e-12)
    assert scores["spearman"] == pytest.approx(stats.spearmanr(x, t)[0], abs=1e-12)


def test_degenerate_metrics_are_zero_not_nan():
    assert compute_metrics(["matthews"], [1, 1, 1], [1, 1, 1])["matthews"] == 0.0  # one class only
    assert compute_metrics(["f1"], [0, 0, 0], [0, 0, 0])["f1"] == 0.0  # no positive class anywhere
    assert compute_metrics(["spearman"], [0.5, 0.5], [0.1, 0.2])["spearman"] == 0.0
