"""`kroncompress export --onnx` / kc.io.export_onnx: the factorised graph, run by onnxruntime, gives
PyTorch's logits on new batch sizes, lengths and padded rows."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import kroncompress as kc

from conftest import build_inputs, build_tiny, recipe_of

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from kroncompress.io import onnx as kc_onnx  # noqa: E402  (needs the optional onnx packages)

# every strategy at once, the embedding factorised with the head tied to it (as kn-gpt2 does)
MIXED = [(["transformer.wte"], "kronecker", {"b_shape": [1, 2]}),
         (["role:attn.qkv"], "kronecker", {"ratio": 2}),
         (["role:attn.o"], "tucker", {"ratio": 2, "n_iter_max": 3}),
         (["transformer.h.0.mlp.c_fc"], "tt", {"ratio": 2}),
         (["transformer.h.1.mlp.c_fc"], "cp", {"ratio": 2, "n_iter_max": 3}),
         (["transformer.h.*.mlp.c_proj"], "svd", {"rank": 8})]


def _compressed(arch, rules, **overrides):
    model = build_tiny(arch, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weight-only initialisation
        kc.compress(model, recipe_of(*rules))
    return model


def run(*args):
    from click.testing import CliRunner

    from kroncompress.cli.main import cli

    return CliRunner(env={"COLUMNS": "220"}).invoke(cli, [str(a) for a in args])  # rich wraps at narrow widths


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The CLI's export of a model with every strategy: (model, folder, the export's onnx.json + path)."""
    root = tmp_path_factory.mktemp("onnx")
    model = _compressed("gpt2", MIXED)
    strategies = {e["strategy"] for e in model.config.kroncompress["modules"].values()}
    assert strategies == {"kronecker", "tucker", "tt", "cp", "svd"}, strategies
    folder = kc.save_compressed(model, root / "compressed")
    result = run("export", folder, "--onnx", "--output", root / "onnx")
    assert result.exit_code == 0, result.output
    assert "onnxruntime's logits match PyTorch's to" in result.output
    info = json.loads((root / "onnx" / "onnx.json").read_text())
    return model, folder, kc_onnx.OnnxExport(root / "onnx", info["opset"], info["max_abs_diff"], info["tolerance"],
                                             info["checked_shapes"])


def test_onnxruntime_logits_match_pytorch_on_new_shapes(exported):
    import onnxruntime

    model, _, result = exported
    session = onnxruntime.InferenceSession(str(result.path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    eps = torch.finfo(torch.float32).eps
    width, depth = 4 * model.config.n_embd, model.config.n_layer  # the widest dot product (the MLP), the blocks
    for batch, length, pad in [(1, 1, 0), (1, 21, 0), (4, 17, 5)]:
        ids = build_inputs("gpt2", batch=batch, length=length, seed=batch + length)["input_ids"]
        mask = torch.ones_like(ids)
        if pad:
            mask[0, :pad] = 0   # left-padded row
            mask[-1, -pad:] = 0  # right-padded row
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask).logits
        got = torch.from_numpy(session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0])
        assert got.shape == expected.shape
        kept = mask.bool()
        # float32 reordering: a length-K dot product moves by <= ~K eps of its size, once per block and the head
        tolerance = eps * width * (depth + 1) * max(1.0, expected[kept].abs().max().item())
        diff = (got - expected)[kept].abs().max().item()
        assert diff <= tolerance, (batch, length, diff, tolerance)
    assert 0 <= result.max_abs_diff <= result.tolerance


def test_the_folder_holds_the_graph_configs_and_the_check(exported):
    _, folder, result = exported
    names = {p.name for p in result.path.iterdir()}
    assert {"model.onnx", "onnx.json", "config.json", "generation_config.json"} <= names
    assert "model.safetensors" not in names  # the weights are in the graph
    info = json.loads((result.path / "onnx.json").read_text())
    assert info["past_key_values"] is False and info["opset"] == result.opset
    assert info["max_abs_diff"] == result.max_abs_diff and info["checked_shapes"] == [[2, 8], [3, 13]]
    # the graph holds the factors, not dense matrices: about the compressed model's parameter count
    import onnx

    stored = sum(int(torch.tensor(list(t.dims)).prod()) for t in onnx.load(str(result.path / "model.onnx")).graph.initializer)
    params = kc.load_compressed(folder).num_parameters()
    assert stored < 1.05 * params + 4096, (stored, params)


def test_a_failed_check_writes_nothing(tmp_path, monkeypatch):
    model = _compressed("gpt2", [(["role:mlp"], "svd", {"rank": 4})], n_layer=1)
    monkeypatch.setattr(kc_onnx, "logits_tolerance", lambda config, reference: -1.0)
    with pytest.raises(kc_onnx.OnnxCheckError, match="differ from PyTorch's.*nothing was written"):
        kc_onnx.export_onnx(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_refusals(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"supports causal language models .*BertForMaskedLM is not one"):
        kc_onnx.export_onnx(build_tiny("bert"), tmp_path / "bert")
    with pytest.raises(ValueError, match=r"float32.*model\.float\(\)"):
        kc_onnx.export_onnx(build_tiny("gpt2").to(torch.bfloat16), tmp_path / "bf16")
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        kc_onnx.export_onnx(build_tiny("gpt2"), tmp_path / "taken")
    import builtins

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "onnxscript" else real_import(name, *a, **k))
    with pytest.raises(ValueError, match=r"needs onnxscript: pip install 'kroncompress\[onnx\]'"):
        kc_onnx.export_onnx(build_tiny("gpt2"), tmp_path / "x")


@pytest.mark.parametrize("args, expected", [
    (["--dense", "--onnx"], "export needs one format"),
    (["--dense", "--opset", "18"], "--opset applies to --onnx only"),
])
def test_cli_refusals(exported, tmp_path, args, expected):
    _, folder, _ = exported
    result = run("export", folder, *args, "--output", tmp_path / "out")
    assert result.exit_code == 2 and f"error: {expected}" in result.output, result.output
    assert not (tmp_path / "out").exists()
