"""The distillation engine on a tiny GPT-2: terms decrease, resume equivalence, the NaN guard, a frozen teacher."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import TrainerCallback

import kroncompress as kc
from kroncompress.distill.trainer import NonFiniteLossError, distill, last_checkpoint
from kroncompress.recipe import DistillConfig, LogitsKL, LossWeights, TrainConfig

NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


@pytest.fixture
def pair(tiny_model):
    """(student, teacher): the teacher is a tiny GPT-2, the student its kn-gpt2 compression."""
    teacher = tiny_model("gpt2", **NO_DROPOUT)
    student = copy.deepcopy(teacher)
    kc.compress(student, kc.load_recipe("kn-gpt2"))
    return student, teacher


def blocks(count: int = 16, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 128, (count, length), generator=torch.Generator().manual_seed(seed))


def config(losses: LossWeights | None = None, **train) -> DistillConfig:
    settings = dict(batch_size=4, lr=3e-3, warmup_ratio=0.0, max_steps=6, seed=0)
    return DistillConfig(losses=losses or LossWeights(), train=TrainConfig(**{**settings, **train}))


def only(term: str) -> LossWeights:
    weights = dict(ce=0.0, logits_kl=LogitsKL(0.0), hidden_mse=0.0, attention_kl=0.0, embedding_mse=0.0)
    weights[term] = LogitsKL(1.0, 2.0) if term == "logits_kl" else 1.0
    return LossWeights(**weights)


@pytest.mark.parametrize("term", ["ce", "logits_kl", "hidden_mse", "attention_kl", "embedding_mse"])
def test_each_loss_term_decreases_under_training(term, tiny_model, tmp_path):
    # a teacher with sharp attention (large init) and a student from another seed: every term starts large
    teacher = tiny_model("gpt2", initializer_range=0.2, **NO_DROPOUT)
    student = tiny_model("gpt2", seed=1, **NO_DROPOUT)
    kc.compress(student, kc.load_recipe("kn-gpt2"))
    data = blocks(4)  # one batch, seen every step: the curve is not noise
    result = distill(student, teacher, config(only(term), lr=1e-2, max_steps=6), data, output_dir=tmp_path,
                     progress=False, log_every=1)
    curve = [entry[term] for entry in result.loss_history]
    assert len(curve) == 6 and set(result.final_losses) == {"loss", term}
    assert curve[-1] < 0.9 * curve[0], curve


def test_result_history_checkpoints_and_a_frozen_teacher(pair, tmp_path):
    student, teacher = pair
    teacher_before = copy.deepcopy(teacher.state_dict())
    result = distill(student, teacher, config(max_steps=4, eval_every=2, save_every=2), blocks(), blocks(4, seed=1),
                     output_dir=tmp_path, progress=False, log_every=2)
    assert result.steps == 4
    assert [e["step"] for e in result.eval_history] == [0, 2, 4]
    assert all(e["perplexity"] > 1 for e in result.eval_history)
    assert set(result.final_losses) == {"loss", "ce", "hidden_mse", "attention_kl", "embedding_mse"}
    assert result.tokens == 4 * 4 * 16
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert last_checkpoint(tmp_path).endswith("checkpoint-4")
    saved = json.loads((tmp_path / "distill_result.json").read_text())
    assert saved["steps"] == 4 and saved["eval_history"] == result.eval_history
    assert not student.training
    # the teacher: eval mode, no gradients, bit-identical weights
    assert not teacher.training
    for name, param in teacher.named_parameters():
        assert not param.requires_grad and param.grad is None, name
        assert torch.equal(param, teacher_before[name]), name
    # the checkpoint of a student with a Kronecker-tied head loads back to the same logits
    from safetensors.torch import load_file

    fresh = copy.deepcopy(student)
    with torch.no_grad():
        for param in fresh.parameters():
            param.zero_()
    fresh.load_state_dict(load_file(str(tmp_path / "checkpoint-4" / "model.safetensors")), strict=False)
    ids = blocks(1)
    torch.testing.assert_close(fresh(input_ids=ids).logits, student(input_ids=ids).logits)


class StopAt(TrainerCallback):
    """Kills the run after `step` steps, as an interruption would (after that step's checkpoint)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_resume_ends_where_an_uninterrupted_run_would(pair, tmp_path):
    student, teacher = pair
    initial = copy.deepcopy(student)
    settings = config(max_steps=6, save_every=3, warmup_ratio=0.2, grad_accum=2)
    data = blocks(20)

    straight = copy.deepcopy(initial)
    distill(straight, teacher, settings, data, output_dir=tmp_path / "straight", progress=False)

    interrupted = copy.deepcopy(initial)
    distill(interrupted, teacher, settings, data, output_dir=tmp_path / "resumed", progress=False, callbacks=[StopAt(3)])
    assert last_checkpoint(tmp_path / "resumed").endswith("checkpoint-3")
    with pytest.raises(ValueError, match="resume=True"):
        distill(copy.deepcopy(initial), teacher, settings, data, output_dir=tmp_path / "resumed", progress=False)
    resumed = copy.deepcopy(initial)  # a fresh process would rebuild the student the same way
    result = distill(resumed, teacher, settings, data, output_dir=tmp_path / "resumed", progress=False, resume=True)

    assert result.steps == 6 and result.resumed_from.endswith("checkpoint-3")
    moved = max(float((a - b).detach().abs().max()) for a, b in zip(straight.parameters(), initial.parameters()))
    assert moved > 1e-3  # training did change the weights
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)

    # resuming a finished run trains no further: it reloads the final weights
    again = copy.deepcopy(initial)
    assert distill(again, teacher, settings, data, output_dir=tmp_path / "resumed", progress=False, resume=True).steps == 6
    for a, b in zip(again.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_resume_without_checkpoint_starts_fresh(pair, tmp_path):
    student, teacher = pair
    result = distill(student, teacher, config(max_steps=1), blocks(4), output_dir=tmp_path, progress=False, resume=True)
    assert result.steps == 1 and result.resumed_from is None


class Poison(TrainerCallback):
    """Fills one weight of `model` with NaN before step `step` (1-based)."""

    def __init__(self, model, step: int):
        self.model, self.step = model, step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            with torch.no_grad():
                self.model.get_parameter("transformer.wpe.weight").fill_(float("nan"))


@pytest.mark.parametrize("weights, poisoned, named, clean", [
    (only("ce"), "student", "ce=nan", []),
    (LossWeights(ce=1.0, logits_kl=LogitsKL(0.0), hidden_mse=0.0, attention_kl=0.0, embedding_mse=1.0), "teacher",
     "embedding_mse=nan", ["ce="]),
])
def test_non_finite_loss_stops_naming_step_and_term(weights, poisoned, named, clean, pair, tmp_path):
    student, teacher = pair
    target = student if poisoned == "student" else teacher
    with pytest.raises(NonFiniteLossError) as info:
        distill(student, teacher, config(weights, max_steps=6, save_every=2), blocks(), output_dir=tmp_path,
                progress=False, callbacks=[Poison(target, 3)])
    message = str(info.value)
    assert "step 3 of 6" in message and named in message and "checkpoint-2" in message
    assert not any(text in message for text in clean)
    assert last_checkpoint(tmp_path).endswith("checkpoint-2")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_layer_dropped_student_distils_with_the_kept_map(tiny_model, tmp_path):
    teacher = tiny_model("gpt2", n_layer=4, **NO_DROPOUT)
    student = copy.deepcopy(teacher)
    kc.compress(student, kc.Recipe.from_dict({"version": 1, "name": "drop", "compress": [
        {"targets": ["transformer.h"], "strategy": "layerdrop", "options": {"keep": [0, 3]}}]}))
    result = distill(student, teacher, config(max_steps=2), blocks(8), output_dir=tmp_path, progress=False)
    assert result.steps == 2 and "hidden_mse" in result.final_losses


def test_other_vocabulary_teacher_is_refused(pair, tiny_model, tmp_path):
    student, _ = pair
    with pytest.raises(ValueError, match="share one tokenizer"):
        distill(student, tiny_model("gpt2", vocab_size=96), config(), blocks(), output_dir=tmp_path, progress=False)


# -- the pipeline behind `kroncompress compress` ---------------------------------------------------

WORDS = ("the king and queen walk to the castle at night while a dog sleeps by the warm fire and "
         "birds sing in the old green tree near the river where children play").split()


@pytest.fixture
def tiny_gpt2_folder(tmp_path):
    """A tiny GPT-2 (byte-level tokenizer, 257 tokens) saved with its tokenizer, and a local text file."""
    import random

    import transformers

    from kroncompress.tokenizers import byte_tokenizer

    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=257, n_positions=64,
                                     bos_token_id=256, eos_token_id=256, **NO_DROPOUT)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    folder = tmp_path / "tiny-gpt2"
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    rng = random.Random(0)
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(120)))
    return folder, text


def test_pipeline_end_to_end(tiny_gpt2_folder, tmp_path):
    from kroncompress.io import OutputExistsError
    from kroncompress.pipeline import run_pipeline

    folder, text = tiny_gpt2_folder
    output = tmp_path / "run"
    report = run_pipeline(folder, "kn-gpt2", output, data=str(text), max_steps=3, progress=False,
                          cache_dir=tmp_path / "cache")
    assert report["params_after"] < report["params_before"]
    stages = report["perplexity"]
    assert set(stages) == {"teacher", "compressed", "distilled"}
    for stage in stages.values():
        assert stage["perplexity"] > 1 and stage["block_size"] == 64 and stage["stride"] == 32 and stage["tokens"] > 0
    assert stages["teacher"]["tokens"] == stages["distilled"]["tokens"]  # one protocol for all three
    assert report["distill"]["steps"] == 3
    assert [p["step"] for p in report["distill"]["eval_history"]] == [0, 1, 2, 3]
    assert report["distill"]["teacher_validation_perplexity"] > 1

    saved = json.loads((output / "report.json").read_text())
    assert saved["perplexity"] == json.loads(json.dumps(stages))
    assert saved["params_before"] == report["params_before"] and saved["distill"]["steps"] == 3
    assert not (output / "checkpoints").exists()  # the finished folder replaced the checkpoints
    model = kc.load_compressed(output)
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]
    assert (output / "tokenizer.json").is_file() and (output / "recipe.yaml").is_file()
    assert report["plot"] == "perplexity.png" and (output / "perplexity.png").stat().st_size > 0

    with pytest.raises(OutputExistsError, match="overwrite"):
        run_pipeline(folder, "kn-gpt2", output, data=str(text), max_steps=1, progress=False)


def test_pipeline_refuses_an_unfinished_run_without_resume(tiny_gpt2_folder, tmp_path):
    from kroncompress.io import OutputExistsError
    from kroncompress.pipeline import run_pipeline

    folder, text = tiny_gpt2_folder
    (tmp_path / "run" / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(OutputExistsError, match="resume=True"):
        run_pipeline(folder, "kn-gpt2", tmp_path / "run", data=str(text), max_steps=1, progress=False)


def test_progress_display_shows_steps_and_terms(pair, tmp_path, monkeypatch, capsys):
    student, teacher = pair
    monkeypatch.setenv("KRONCOMPRESS_FORCE_PROGRESS", "1")  # stdout is no terminal under pytest
    distill(student, teacher, config(max_steps=2), blocks(8), output_dir=tmp_path / "a", progress=True, log_every=1)
    shown = capsys.readouterr()
    assert "hidden_mse" in shown.err and "hidden_mse" not in shown.out  # on stderr: stdout is for results
    distill(copy.deepcopy(student), teacher, config(max_steps=2), blocks(8), output_dir=tmp_path / "b", progress=False)
    shown = capsys.readouterr()
    assert "hidden_mse" not in shown.out + shown.err


# -- the transformers adapter --------------------------------------------------------------------------

def test_installed_transformers_is_in_the_supported_range():
    import tomllib
    from pathlib import Path

    import transformers
    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirement = next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "transformers")
    assert any(spec.operator in ("<", "<=", "~=", "==") for spec in requirement.specifier), \
        f"state the supported transformers range with an upper bound, not {requirement}"
    assert requirement.specifier.contains(transformers.__version__, prereleases=True), \
        f"transformers {transformers.__version__} is outside the supported range {requirement.specifier}"


def test_the_trainer_adapter_overrides_only_listed_private_methods_that_still_exist():
    import inspect

    from transformers import Trainer

    from kroncompress.distill.hf_trainer import PRIVATE_OVERRIDES, DistillTrainer

    overridden = {name for name in vars(DistillTrainer)
                  if name.startswith("_") and not name.startswith("__") and hasattr(Trainer, name)}
    assert overridden == set(PRIVATE_OVERRIDES), "list every private Trainer override in PRIVATE_OVERRIDES, with why"
    for name in PRIVATE_OVERRIDES:
        ours, theirs = (inspect.signature(getattr(cls, name)).parameters.values() for cls in (DistillTrainer, Trainer))
        assert [(p.name, p.kind, p.default) for p in ours] == [(p.name, p.kind, p.default) for p in theirs], name
    for hook in ("compute_loss", "log", "evaluation_loop"):  # the public hooks used
        assert hasattr(Trainer, hook), hook
    # loss_is_scaled_for_ga is new in 5.2x; before it, model_accepts_loss_kwargs = False (set in __init__) is what
    # makes the Trainer divide our per-batch mean by the accumulation steps, as loss_is_scaled_for_ga = False does
    assert hasattr(Trainer, "loss_is_scaled_for_ga") or "model_accepts_loss_kwargs" in inspect.getsource(Trainer.training_step)


# -- resume: the same run, an intact checkpoint, sound weights ----------------------------------------

def _interrupted(pair, tmp_path, **train):
    """A run of `config(**train)` stopped after step 2 (checkpoint-2 written); returns its initial student."""
    student, teacher = pair
    initial = copy.deepcopy(student)
    distill(student, teacher, config(**{"max_steps": 4, "save_every": 2, **train}), blocks(), output_dir=tmp_path,
            progress=False, callbacks=[StopAt(2)], run_settings={"recipe": "kn-gpt2 (abc)"})
    assert last_checkpoint(tmp_path).endswith("checkpoint-2")
    return initial, teacher


@pytest.mark.parametrize("change, named", [
    (dict(max_steps=6), "max_steps 4 then, 6 now"),
    (dict(data=blocks(seed=1)), "train_data"),
    (dict(lr=1e-3), "train.lr 0.003 then, 0.001 now"),
    (dict(batch_size=2), "train.batch_size 4 then, 2 now"),
    (dict(run_settings={"recipe": "kn-gpt2-mlp (def)"}), 'recipe "kn-gpt2 (abc)" then, "kn-gpt2-mlp (def)" now'),
])
def test_resume_refuses_changed_settings_naming_both_values(change, named, pair, tmp_path):
    initial, teacher = _interrupted(pair, tmp_path)
    change = dict(change)
    data = change.pop("data", blocks())
    extra = change.pop("run_settings", {"recipe": "kn-gpt2 (abc)"})
    with pytest.raises(kc.distill.ResumeError) as info:
        distill(copy.deepcopy(initial), teacher, config(**{"max_steps": 4, "save_every": 2, **change}), data,
                output_dir=tmp_path, progress=False, resume=True, run_settings=extra)
    message = str(info.value)
    assert named in message and "checkpoint-2" in message and "\n" not in message
    assert "re-run with the same values" in message and "--overwrite" in message
    # nothing was trained or rewritten: the same settings still resume
    result = distill(copy.deepcopy(initial), teacher, config(max_steps=4, save_every=2), blocks(), output_dir=tmp_path,
                     progress=False, resume=True, run_settings={"recipe": "kn-gpt2 (abc)"})
    assert result.steps == 4 and result.resumed_from.endswith("checkpoint-2")


@pytest.mark.parametrize("recorded", [True, False], ids=["settings-recorded", "older-run-without-record"])
def test_resume_with_a_student_of_another_recipe_is_one_clear_error(recorded, pair, tmp_path, tiny_model):
    _, teacher = _interrupted(pair, tmp_path)
    if not recorded:
        (tmp_path / "run_settings.json").unlink()
    other = tiny_model("gpt2", **NO_DROPOUT)
    kc.compress(other, kc.load_recipe("svd-gpt2"))
    with pytest.raises(kc.distill.ResumeError, match="another model or recipe|student") as info:
        distill(other, teacher, config(max_steps=4, save_every=2), blocks(), output_dir=tmp_path, progress=False,
                resume=True, run_settings={"recipe": "kn-gpt2 (abc)"})
    assert "\n" not in str(info.value) and "--overwrite" in str(info.value)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [
    lambda folder: _truncate(folder / "model.safetensors"),
    lambda folder: (folder / "trainer_state.json").unlink(),
    lambda folder: _truncate(folder / "optimizer.pt"),
    lambda folder: (folder / "model.safetensors").write_bytes(b"\x00" * 64),
], ids=["truncated-weights", "no-trainer-state", "truncated-optimizer", "garbage-weights"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(damage, pair, tmp_path):
    student, teacher = pair
    initial = copy.deepcopy(student)
    settings = config(max_steps=6, save_every=3)
    distill(student, teacher, settings, blocks(), output_dir=tmp_path, progress=False)  # checkpoints 3 and 6
    damage(tmp_path / "checkpoint-6")
    assert last_checkpoint(tmp_path).endswith("checkpoint-3")
    resumed = copy.deepcopy(initial)
    with pytest.warns(UserWarning, match="checkpoint-6 .* is damaged .*resuming from checkpoint-3"):
        result = distill(resumed, teacher, settings, blocks(), output_dir=tmp_path, progress=False, resume=True)
    assert result.steps == 6 and result.resumed_from.endswith("checkpoint-3")
    for (name, a), b in zip(student.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)  # as the uninterrupted run ended


def test_no_intact_checkpoint_is_one_clear_error(pair, tmp_path):
    student, teacher = pair
    distill(copy.deepcopy(student), teacher, config(max_steps=4, save_every=2), blocks(), output_dir=tmp_path,
            progress=False)
    _truncate(tmp_path / "checkpoint-4" / "model.safetensors")
    (tmp_path / "checkpoint-2" / "trainer_state.json").unlink()
    with pytest.raises(kc.distill.ResumeError) as info:
        distill(student, teacher, config(max_steps=4, save_every=2), blocks(), output_dir=tmp_path, progress=False,
                resume=True)
    message = str(info.value)
    assert "no intact checkpoint" in message and "checkpoint-4: model.safetensors is truncated" in message
    assert "checkpoint-2: trainer_state.json is missing" in message and "\n" not in message
    with pytest.raises(ValueError, match="already holds checkpoints .newest: checkpoint-4"):  # damaged ones count
        distill(student, teacher, config(max_steps=4, save_every=2), blocks(), output_dir=tmp_path, progress=False)


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_non_finite_source_weights_are_refused_before_training(role, pair, tmp_path):
    student, teacher = pair
    target = student if role == "student" else teacher
    with torch.no_grad():
        target.get_parameter("transformer.h.1.ln_2.weight")[3] = float("nan")
    with pytest.raises(kc.distill.NonFiniteWeightsError) as info:
        distill(student, teacher, config(max_steps=2), blocks(), output_dir=tmp_path, progress=False)
    message = str(info.value)
    assert f"the {role}'s parameter transformer.h.1.ln_2.weight holds 1 NaN/inf" in message
    assert "source weights are broken" in message and "Lower the learning rate" not in message
    assert isinstance(info.value, ValueError) and not any(tmp_path.iterdir())  # before any work


def test_cli_resume_with_another_max_steps_exits_2_naming_it(tiny_gpt2_folder, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from kroncompress.cli.main import cli

    folder, text = tiny_gpt2_folder
    output = tmp_path / "run"
    args = ["compress", str(folder), "--recipe", "kn-gpt2", "--output", str(output), "--data", str(text)]

    def killed(*_, **__):  # a run killed after distillation, before the final save
        raise KeyboardInterrupt

    monkeypatch.setenv("KRONCOMPRESS_CACHE", str(tmp_path / "cache"))
    with monkeypatch.context() as patch:
        patch.setattr("kroncompress.io.save_compressed", killed)
        CliRunner().invoke(cli, [*args, "--max-steps", "2"])
    assert last_checkpoint(output / "checkpoints").endswith("checkpoint-2")
    other = tmp_path / "other.txt"
    other.write_text(text.read_text()[::-1])
    for extra, named in ((["--max-steps", "3"], "max_steps 2 then, 3 now"),
                         (["--max-steps", "2", "--recipe", "kn-gpt2-mlp"], "recipe"),
                         (["--max-steps", "2", "--data", str(other)], "data.files")):
        result = CliRunner().invoke(cli, [*args, *extra, "--resume"])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert lines[-1].startswith("error: cannot resume") and named in lines[-1], result.output


def test_an_unfinished_run_with_its_settings_record_counts_as_ours():
    from kroncompress.distill.checkpoints import SETTINGS_NAME
    from kroncompress.distill.trainer import RESULT_NAME
    from kroncompress.outputs import RUN_FILES

    # else --resume would refuse every run the engine started, as a folder kroncompress did not write
    assert {SETTINGS_NAME, RESULT_NAME} <= set(RUN_FILES)


@pytest.mark.parametrize("ratio, steps, warmup", [(0.05, 100, 5), (0.1, 40, 4), (0.0, 100, 0)])
def test_a_warmup_ratio_means_the_same_steps_under_the_installed_transformers(ratio, steps, warmup, tmp_path):
    """version_arguments picks the keywords the installed TrainingArguments reads as a fraction (4.x: warmup_ratio;
    5.x: a float warmup_steps): the warmup the Trainer schedules is that fraction of the steps, not 0."""
    from transformers import TrainingArguments

    from kroncompress.distill.hf_trainer import version_arguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                             **version_arguments(warmup_ratio=ratio, activation_checkpointing=True))
    assert args.get_warmup_steps(steps) == warmup
    assert args.gradient_checkpointing or getattr(args, "activation_checkpointing", False)
