"""ONNX export of a compressed causal language model that keeps the factorised graph (and so the savings):

    kc.io.export_onnx("runs/kn-gpt2", "runs/kn-gpt2-onnx")   # or: kroncompress export DIR --onnx -o OUT

The graph comes from `torch.onnx.export(..., dynamo=True)` (torch.export, then onnxscript), so each
Kronecker / low-rank / Tucker / CP / TT layer stays the few small matmuls it is in PyTorch. What we chose:

- inputs `input_ids` and `attention_mask` (int64, [batch, sequence], both axes dynamic; the mask lets a
  batch hold left- or right-padded prompts), output `logits` (float32, [batch, sequence, vocab]);
- no past key values: every call recomputes the whole sequence. A graph with a KV cache would carry the
  cache layout of one transformers release as 2 x layers extra inputs and outputs; logits-only is the
  graph every ONNX runtime can drive, and for short generations of small models it is the cheaper one to
  maintain (docs/deployment.md measures what it costs in tokens/s);
- float32 weights, whatever the folder holds (onnxruntime's CPU kernels are float32 first).

The export is checked before it is moved into place: onnxruntime's logits against PyTorch's, on the
example batch and on a padded batch of another shape (so the dynamic axes and the mask are exercised),
within `logits_tolerance`. The folder holds model.onnx (external data beside it past 2 GB), the source
folder's config, generation config and tokenizer files, and onnx.json (inputs, outputs, opset, the check).
Needs `pip install 'kroncompress[onnx]'` (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kroncompress.io.checks import CONFIG_NAME, WEIGHTS_NAME
from kroncompress.io.load import load_compressed
from kroncompress.io.save import move_into_place
from kroncompress.outputs import OutputExistsError

ONNX_NAME = "model.onnx"
INFO_NAME = "onnx.json"
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("logits",)
# copied from the source folder: everything a runtime needs besides the graph (tokenizer, configs)
_SKIP = {WEIGHTS_NAME, "README.md", "report.json", "recipe.yaml"}


class OnnxCheckError(ValueError):
    """onnxruntime's logits of an export differ from PyTorch's by more than the tolerance."""


@dataclass
class OnnxExport:
    """What `export_onnx` wrote and how its check went."""

    path: Path
    opset: int
    max_abs_diff: float
    tolerance: float
    checked_shapes: list


class LogitsOnly(nn.Module):
    """`model(input_ids, attention_mask).logits` without a cache: the function the graph computes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def logits_tolerance(config: Any, reference: torch.Tensor) -> float:
    """How far two float32 evaluations of the same network may differ (onnxruntime and PyTorch order their
    sums differently): a dot product of length K reordered moves by up to ~K eps relative to its magnitude
    (the classical bound); each block adds one such error on the residual stream, the head one more. So
    eps(float32) * width * (blocks + 1) * max(1, max |logit|), width the largest inner dimension
    (hidden or MLP size). Not tuned to any measurement."""
    eps = torch.finfo(torch.float32).eps
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    inner = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
             or getattr(config, "ffn_dim", None) or 4 * hidden)  # GPT-2 leaves n_inner unset: 4 x n_embd
    width = max(hidden, int(inner), 1)
    blocks = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0) or 1)
    return float(eps * width * (blocks + 1) * max(1.0, reference.abs().max().item()))


def _require_onnx() -> None:
    missing = []
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ValueError(f"ONNX export needs {', '.join(missing)}: pip install 'kroncompress[onnx]' "
                         "(or pip install onnx onnxscript onnxruntime)")


def _optimize(model: Any) -> None:
    """onnxscript's optimizer (constant folding, rewrites), as torch.onnx.export(optimize=True) runs it, but
    folding a computation on weights only when its result is no larger than the weights it replaces: the
    default folds e.g. CP's Khatri-Rao products (out x R from out_k x R factors) into the file, which would
    give back the savings. Tensors of up to _FOLD_ANY elements (shapes, small constants) fold freely."""
    from onnxscript import optimizer

    optimizer.optimize_ir(model, output_size_limit=_FOLD_ANY)
    # the exporter's debug notes on every node (the FX node, the module path, the Python stack) take more
    # bytes than a small model's weights; runtimes never read them
    for node in model.graph.all_nodes():
        node.metadata_props.clear()


_FOLD_ANY = 1024


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's notes that say nothing about the result: optional torchvision ops skipped, both inputs'
    axes sharing one name (they do: input_ids and attention_mask have one batch and one sequence axis)."""
    import logging

    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def _check_causal_lm(model: nn.Module, source: Any) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = type(model).__name__
    if name not in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) or model.get_output_embeddings() is None:
        raise ValueError(f"{source}: ONNX export supports causal language models (logits from input_ids); "
                         f"{name} is not one. Export it dense (kroncompress export --dense) and use its "
                         "architecture's ONNX exporter (e.g. optimum)")


def _example(model: nn.Module, batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    vocab = int(model.config.vocab_size)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _max_positions(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return None


def check_onnx(path: str | os.PathLike, model: nn.Module, batches: list[dict[str, torch.Tensor]],
               threads: int | None = None) -> tuple[float, float]:
    """Run the ONNX file with onnxruntime (CPU) on each batch and compare with `model`'s logits at the
    positions the mask keeps. Returns (max |difference|, the tolerance of `logits_tolerance`)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    worst, tolerance = 0.0, 0.0
    for batch in batches:
        with torch.no_grad():
            reference = LogitsOnly(model)(**batch)
        got = torch.from_numpy(session.run(list(OUTPUT_NAMES), {k: v.numpy() for k, v in batch.items()})[0])
        kept = batch["attention_mask"].bool()  # padded positions' logits are meaningless in both
        worst = max(worst, (got - reference)[kept].abs().max().item())
        tolerance = max(tolerance, logits_tolerance(model.config, reference[kept]))
    return worst, tolerance


@torch.no_grad()
def export_onnx(source: str | os.PathLike | nn.Module, output: str | os.PathLike, *, overwrite: bool = False,
                opset: int | None = None, check: bool = True) -> OnnxExport:
    """Export a compressed causal LM (a folder written by save_compressed, or the model object) to an ONNX
    folder at `output`, atomically; see the module docs for the graph's inputs and outputs. With `check`
    (default), onnxruntime's logits must match PyTorch's within `logits_tolerance` (OnnxCheckError
    otherwise, and nothing is written). `opset`: the ONNX opset (default: torch's)."""
    _require_onnx()
    target = Path(output)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"output folder {target} already exists; pass overwrite=True or pick another folder")
    folder = None
    if isinstance(source, nn.Module):
        model = source
        if any(p.dtype != torch.float32 for p in model.parameters()):
            raise ValueError("ONNX export writes float32 weights: call model.float() first (or export the saved folder)")
    else:
        folder = Path(source)
        if not (folder / CONFIG_NAME).is_file():
            raise ValueError(f"{folder}: no {CONFIG_NAME}; give a folder written by kroncompress compress / kc.save_compressed")
        model = load_compressed(folder, dtype=torch.float32)
    _check_causal_lm(model, folder or type(model).__name__)
    was_training = model.training
    model.eval()
    limit = _max_positions(model.config) or 64
    example = _example(model, batch=2, length=min(8, limit), seed=0)
    # another batch size and length, right- and left-padded rows: the dynamic axes and the mask at work
    other = _example(model, batch=3, length=min(13, limit), seed=1)
    other["attention_mask"][0, -4:] = 0
    other["attention_mask"][1, :3] = 0
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence", max=limit)
    shapes = {name: {0: batch, 1: sequence} for name in INPUT_NAMES}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with _quiet_exporter():
            program = torch.onnx.export(LogitsOnly(model).eval(), (), kwargs=example, dynamo=True,
                                        opset_version=opset, input_names=list(INPUT_NAMES),
                                        output_names=list(OUTPUT_NAMES), dynamic_shapes=shapes, verbose=False,
                                        optimize=False)
            _optimize(program.model)
        program.save(str(tmp / ONNX_NAME))
        opset_used = int(next((o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx")), 0))
        worst, tolerance = float("nan"), float("nan")
        if check:
            worst, tolerance = check_onnx(tmp / ONNX_NAME, model, [example, other])
            if not worst <= tolerance:
                raise OnnxCheckError(f"{target}: onnxruntime's logits differ from PyTorch's by {worst:.3g} (tolerance "
                                     f"{tolerance:.3g}); nothing was written. Report it with the folder's config.json")
        result = OnnxExport(target, opset_used, worst, tolerance,
                            [list(example["input_ids"].shape), list(other["input_ids"].shape)] if check else [])
        if folder is not None:
            for item in folder.iterdir():
                if item.is_file() and item.name not in _SKIP and not item.name.startswith("."):
                    shutil.copy2(item, tmp / item.name)
        elif hasattr(model, "config"):
            model.config.save_pretrained(tmp)
        info = {"inputs": {n: "int64 [batch, sequence]" for n in INPUT_NAMES},
                "outputs": {"logits": "float32 [batch, sequence, vocab]"}, "past_key_values": False,
                "max_sequence": limit, **{k: v for k, v in asdict(result).items() if k != "path"},
                "torch": torch.__version__}
        (tmp / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        move_into_place(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.train(was_training)
    return result
