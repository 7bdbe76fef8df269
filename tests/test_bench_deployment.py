"""benchmarks/bench_deployment.py runs end to end on a tiny model (no compile: minutes on CPU) and its
report holds every backend, with the ONNX graph agreeing with eager PyTorch."""

from __future__ import annotations

import pytest

from conftest import import_benchmark

pytest.importorskip("onnxruntime")


def test_bench_deployment_reports_every_backend(tiny_folder, tmp_path):
    bench = import_benchmark("bench_deployment")
    model, _ = tiny_folder
    out = tmp_path / "deployment.md"
    result = bench.main(["--model", str(model), "--output", str(out), "--no-compile", "--rounds", "1",
                         "--prompt", "4", "--new", "3"])
    rows = result["rows"]
    assert set(rows) == {"teacher, eager, KV cache", "kn-gpt2, eager, KV cache", "kn-gpt2, eager, no cache",
                         "kn-gpt2, onnxruntime, no cache"}
    assert rows["kn-gpt2, onnxruntime, no cache"]["max |diff|"] <= result["tolerance"]
    assert rows["kn-gpt2, eager, no cache"]["same tokens"]  # the cache changes the work, not the tokens
    assert all(row["tokens/s"] > 0 for row in rows.values())
    text = out.read_text()
    assert "| kn-gpt2, onnxruntime, no cache |" in text and "model.onnx" in text
    assert result["sizes"]["model.onnx"] < result["sizes"]["teacher model.safetensors"]
