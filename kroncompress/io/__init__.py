"""Save and load compressed models as Hugging Face-style folders; export them back to dense.

    kc.save_compressed(model, "out/", recipe=recipe, report=report)
    model = kc.load_compressed("out/")            # same logits, bit for bit; nothing re-decomposed
    model = AutoModelForCausalLM.from_pretrained("out/")  # the same, kroncompress imported (kroncompress.hf)
    dense = kc.to_dense(model)                    # plain transformers model (save_pretrained/from_pretrained)
    kc.io.verify_folder("out/")                   # [] or one line per problem (truncated weights, bad plan, ...)
    kc.export_dense("out/", "out-dense/")
    kc.io.export_onnx("out/", "out-onnx/")       # ONNX graph of the factorised model (kroncompress[onnx])
    stats.save("stats.safetensors"); kc.CalibrationStats.load("stats.safetensors")  # calibration statistics

A folder holds config.json (with a `kroncompress` section: per-module plans, tied heads, shared
parameters), model.safetensors, recipe.yaml, report.json and a README.md model card. Only safetensors is
ever read, so loading unpickles nothing; and everything read is validated (see `load_compressed`).

Import every name from `kroncompress.io`; the code lives in submodules by responsibility: `save`
(atomic writes), `card` (the model card), `load` (rebuild and strict loading, `verify_folder`), `checks`
(the folder layout, safetensors and config checks), `config` (what makes config.json a kroncompress
checkpoint: the saved section, `quantization_config`, the refusal marker), `dense` (export to a plain
transformers model), `onnx` (ONNX export) and `metadata` (the safetensors header). The calibration statistics
file lives with the statistics (kroncompress.calibration.stats) and is re-exported here.
"""

from __future__ import annotations

from kroncompress.calibration.stats import check_calibration_file, load_calibration, save_calibration  # re-exported
from kroncompress.io.card import source_license
from kroncompress.io.checks import CONFIG_NAME, FOLDER_FILES, WEIGHTS_NAME, check_safetensors, first_nonfinite
from kroncompress.io.dense import export_dense, to_dense
from kroncompress.io.config import saved_section
from kroncompress.io.load import load_compressed, verify_folder
from kroncompress.io.onnx import export_onnx
from kroncompress.io.save import save_compressed
from kroncompress.io.verify import model_key_names
from kroncompress.outputs import OutputExistsError  # noqa: F401  (re-exported, as before; documented there)

# in the order the reference page lists them
__all__ = [
    "WEIGHTS_NAME", "CONFIG_NAME", "FOLDER_FILES", "saved_section", "source_license", "save_compressed",
    "check_safetensors", "first_nonfinite", "model_key_names", "load_compressed", "verify_folder", "to_dense",
    "export_dense", "export_onnx", "save_calibration", "load_calibration", "check_calibration_file",
]
