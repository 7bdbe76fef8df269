"""Stock PEFT loads adapters trained with kc.lora: `PeftModel.from_pretrained` after `import kroncompress`
gives the same logits as kc.lora.load_adapter (kroncompress.peft_compat)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import transformers

import kroncompress as kc

from conftest import build_inputs, logits
from test_lora import RULES, compressed, train, with_adapter

peft = pytest.importorskip("peft")
from kroncompress import peft_compat  # noqa: E402  (needs peft)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Per strategy mix: a compressed folder and a trained adapter (kc.lora), saved."""
    root = tmp_path_factory.mktemp("peft")
    out = {}
    for case in sorted(RULES):
        model = compressed(case)
        folder = kc.save_compressed(model, root / case / "base")
        wrapped = with_adapter(model)
        train(wrapped, steps=3)
        wrapped.save_pretrained(root / case / "adapter")
        out[case] = folder, root / case / "adapter"
    return out


@pytest.mark.parametrize("case", sorted(RULES))
def test_stock_from_pretrained_matches_load_adapter(saved, case):
    folder, adapter = saved[case]
    inputs = build_inputs("gpt2")
    ours = kc.lora.load_adapter(kc.load_compressed(folder), adapter)
    stock = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(folder), adapter)
    assert any(isinstance(m, kc.lora.FactorizedLoraLinear) for m in stock.modules())
    got = logits(stock, inputs)
    assert torch.equal(got, logits(ours, inputs))
    assert not torch.equal(got, logits(kc.load_compressed(folder), inputs))  # the trained adapter is applied


@pytest.mark.parametrize("imports", [
    ["import kroncompress", "from peft import PeftModel"],
    ["from peft import PeftModel", "import kroncompress"],
    # transformers' is_peft_available() looks peft up without importing it: the hook must wait for the import
    ["import kroncompress", "import importlib.util", "assert importlib.util.find_spec('peft')", "from peft import PeftModel"],
], ids=["kroncompress-first", "peft-first", "find-spec-first"])
def test_a_fresh_interpreter_needs_only_import_kroncompress(saved, imports):
    folder, adapter = saved["kronecker"]
    code = "\n".join(imports) + textwrap.dedent(f"""
        import sys
        assert "kroncompress.lora" not in sys.modules
        from transformers import AutoModelForCausalLM
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(folder)!r}), {str(adapter)!r})
        print(sorted({{type(m).__name__ for m in model.modules() if 'Lora' in type(m).__name__}}))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "FactorizedLoraLinear" in result.stdout


def test_install_is_idempotent():
    from peft.tuners.lora.model import LoraModel

    assert peft_compat.install() and peft_compat.install()
    wrapper = LoraModel.__dict__["_create_new_module"].__func__
    assert not getattr(wrapper.__wrapped__, "__kroncompress_dispatch__", False)  # wrapped once, not twice


def test_a_config_that_maps_our_layers_itself_keeps_its_own_layer():
    class Mine(kc.lora.FactorizedLoraLinear):
        pass

    config = peft.LoraConfig(r=4, target_modules=["c_fc"])
    config._register_custom_module({kc.FactorizedLinear: Mine})
    wrapped = peft.get_peft_model(compressed("svd"), config)
    assert {type(m) for m in wrapped.modules() if isinstance(m, kc.lora.FactorizedLoraLinear)} == {Mine}


def test_plain_layers_still_get_peft_s_own_lora_layer():
    model = compressed("svd")  # attention and MLP factorised, lm_head a plain nn.Linear
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["c_fc", "lm_head"]))
    assert type(wrapped.base_model.model.lm_head).__module__.startswith("peft.")


def test_an_unknown_peft_api_is_left_alone_with_a_warning(monkeypatch):
    from peft.tuners.lora.model import LoraModel

    before = LoraModel.__dict__["_create_new_module"]
    monkeypatch.setattr(peft_compat, "unsupported_reason", lambda: "LoraModel._create_new_module takes ['x']")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert peft_compat.install() is False
    assert any("use kc.lora.load_adapter" in str(w.message) for w in caught)
    assert LoraModel.__dict__["_create_new_module"] is before


def test_the_version_guard_reads_peft_versions():
    assert peft_compat._version("0.21.2") == (0, 21, 2) and peft_compat._version("0.17.0.dev0") == (0, 17, 0)
    assert peft_compat._version("1.0rc1") == (1, 0) and peft_compat._version("x") == () and peft_compat._version("0.16.0") < peft_compat.MIN_PEFT
    assert peft_compat.unsupported_reason() is None  # the installed PEFT (the dev extra's) is supported
