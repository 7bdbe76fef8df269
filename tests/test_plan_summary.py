"""The plan, the compress summary and the model card state the modules actually compressed (derived from the
plan, not the recipe's text), and say when a recipe names blocks the model has not got."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import kroncompress as kc
from kroncompress.plans import describe_modules

KN_MATRICES = "attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj"


def _meta_gpt2(layers: int) -> GPT2LMHeadModel:
    with torch.device("meta"):
        return GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=64, n_head=4, vocab_size=128, n_positions=64))


def test_kn_gpt2_on_six_blocks_says_it_compresses_blocks_1_3_5_only():
    plan = kc.plan(_meta_gpt2(6), "kn-gpt2")
    assert plan.compressed == f"transformer.wte; transformer.h blocks 1, 3, 5 of 6 (0-5): {KN_MATRICES}"
    assert plan.notes == ["compress[1].targets[0] names 1|3|5|7|9|11, but this gpt2 has no module for 7, 9, 11: "
                          "only 1, 3, 5 are compressed"]
    assert plan.to_dict()["notes"] == plan.notes and plan.to_dict()["compressed"] == plan.compressed


def test_kn_gpt2_on_twelve_blocks_has_no_note():
    plan = kc.plan(_meta_gpt2(12), "kn-gpt2")
    assert plan.compressed == f"transformer.wte; transformer.h blocks 1, 3, 5, 7, 9, 11 of 12 (0-11): {KN_MATRICES}"
    assert plan.notes == []


def test_describe_modules_groups_blocks_by_their_matrices():
    names = ["model.embed_tokens", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj",
             "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj", "model.layers.3.self_attn.q_proj"]
    assert describe_modules(names, {"model.layers": 4}) == (
        "model.embed_tokens; model.layers blocks 0, 1 of 4 (0-3): mlp.up_proj, mlp.down_proj; "
        "model.layers block 3 of 4 (0-3): self_attn.q_proj")
    assert describe_modules(["encoder.layer.2.output.dense"]) == "encoder.layer block 2: output.dense"


def test_compress_summary_and_model_card_state_the_compressed_blocks(tmp_path):
    from click.testing import CliRunner

    from kroncompress.cli.main import cli

    torch.manual_seed(0)
    folder = tmp_path / "tiny"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64)).save_pretrained(folder)
    result = CliRunner(env={"COLUMNS": "220"}).invoke(
        cli, ["compress", str(folder), "--recipe", "kn-gpt2", "--output", str(tmp_path / "out"), "--no-distill"])
    assert result.exit_code == 0, result.output
    expected = f"transformer.wte; transformer.h block 1 of 2 (0-1): {KN_MATRICES}"
    assert f"compressed: {expected}" in result.stdout
    assert "note: compress[1].targets[0] names 1|3|5|7|9|11, but this gpt2 has no module for 3, 5, 7, 9, 11" in result.stdout
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"- compressed: {expected}" in card and "- note: compress[1].targets[0]" in card
