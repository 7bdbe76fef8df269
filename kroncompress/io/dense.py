"""Dense export: factorized modules replaced by plain ones (`to_dense`), written as a transformers folder
that loads without kroncompress (`export_dense`)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from kroncompress.io.checks import FOLDER_FILES
from kroncompress.io.config import QUANT_METHOD, KronCompressConfig
from kroncompress.io.load import load_compressed
from kroncompress.io.save import move_into_place
from kroncompress.layers.base import FactorizedLinear
from kroncompress.layers.kronecker import KroneckerEmbedding, KroneckerTiedHead
from kroncompress.layers.quantized import dequantize_tensors
from kroncompress.outputs import OutputExistsError
from kroncompress.surgery import CONFIG_KEY, set_submodule, set_tie_word_embeddings


@torch.no_grad()
def to_dense(model: nn.Module) -> nn.Module:
    """Replace every factorized module by its dense equivalent, in place, and return the model.

    Kronecker/low-rank linears become nn.Linear (Conv1D for GPT-2), Kronecker embeddings nn.Embedding, and a
    tied head an nn.Linear sharing the dense embedding's weight (tie_word_embeddings restored). The
    kroncompress config section is dropped, so `save_pretrained` gives a folder that
    `AutoModelForCausalLM.from_pretrained` loads without kroncompress.
    """
    for module in model.modules():  # integer factors (kc.quantize) back to float first
        dequantize_tensors(module)
    replaced: dict[int, nn.Module] = {}
    heads = []
    for name, module in list(model.named_modules()):
        if isinstance(module, KroneckerTiedHead):
            heads.append((name, module))
        elif isinstance(module, (FactorizedLinear, KroneckerEmbedding)) or (
                hasattr(module, "to_dense") and type(module).__module__.startswith("kroncompress.layers")):
            dense = replaced.get(id(module))
            if dense is None:
                dense = module.to_dense()
                dense.train(module.training)
                if isinstance(module, KroneckerEmbedding) and module.padding_idx is not None:
                    dense.padding_idx = module.padding_idx
                replaced[id(module)] = dense
            set_submodule(model, name, dense)
    for name, head in heads:
        embedding = replaced.get(id(head.tied_to))
        if embedding is None:
            raise ValueError(f"{name} is tied to an embedding that is not part of the model; cannot export it")
        dense_head = nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=head.bias is not None,
                               device=embedding.weight.device, dtype=embedding.weight.dtype)
        dense_head.weight = embedding.weight
        if head.bias is not None:
            dense_head.bias = head.bias
        set_submodule(model, name, dense_head)
    config = getattr(model, "config", None)
    if config is not None:
        section = getattr(config, CONFIG_KEY, None) or {}
        tied_head = section.get("tied_head")
        if tied_head:
            set_tie_word_embeddings(model, bool(tied_head.get("tie_word_embeddings", True)))
        if hasattr(config, CONFIG_KEY):
            delattr(config, CONFIG_KEY)
        quantization = getattr(config, "quantization_config", None)
        if isinstance(quantization, KronCompressConfig) or (
                isinstance(quantization, dict) and quantization.get("quant_method") == QUANT_METHOD):
            delattr(config, "quantization_config")  # a plain model now: no kroncompress checkpoint
    model.__dict__.pop("save_pretrained", None)
    return model


def export_dense(source: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False) -> Path:
    """Load a compressed folder, densify it, and write a plain transformers folder (atomically).

    Files other than the kroncompress ones (e.g. tokenizer files) are copied along.
    """
    source, target = Path(source), Path(output)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"output folder {target} already exists; pass overwrite=True or pick another folder")
    model = to_dense(load_compressed(source))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        for item in source.iterdir():
            if item.is_file() and item.name not in FOLDER_FILES and not (tmp / item.name).exists():
                shutil.copy2(item, tmp / item.name)
        move_into_place(tmp, target, overwrite, command="export")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
