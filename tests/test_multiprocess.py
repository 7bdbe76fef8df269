"""Two-process distillation (DDP over gloo on CPU) through torchrun.

The run completes, each rank sees its own data shard, the ranks end with identical weights, and only
rank 0 writes outputs. Set KRONCOMPRESS_SKIP_MULTIPROCESS=1 to skip (e.g. where processes cannot
open local ports). This file is also the worker script torchrun starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
STEPS, BATCH, BLOCKS = 3, 2, 24


@pytest.mark.skipif(os.environ.get("KRONCOMPRESS_SKIP_MULTIPROCESS") == "1", reason="KRONCOMPRESS_SKIP_MULTIPROCESS=1")
def test_two_processes_distil_on_separate_shards(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{HERE.parent}{os.pathsep}{HERE}"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(__file__)), str(tmp_path)]
    # a session of its own, so a hung run can be killed with its workers
    run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        output, _ = run.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        output, _ = run.communicate()
        pytest.fail("the two-process run hung:\n" + output[-3000:])
    assert run.returncode == 0, output[-4000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    first = [set(r["first_batch"]) for r in ranks]
    assert all(len(f) == BATCH for f in first)
    assert first[0].isdisjoint(first[1]), f"both ranks trained on the same blocks first: {first}"
    seen = [set(r["seen"]) for r in ranks]
    assert seen[0].isdisjoint(seen[1])
    assert min(map(len, seen)) >= STEPS * BATCH  # the loader may read one batch ahead
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # DDP kept the replicas in sync
    assert ranks[0]["steps"] == ranks[1]["steps"] == STEPS
    assert ranks[0]["tokens"] == 2 * STEPS * BATCH * 16  # counted over both processes

    # each rank was given its own output folder: rank 0 wrote the outputs; rank 1 only its own RNG state,
    # which the Trainer keeps per rank in the shared checkpoint so a resumed run replays each rank's randomness
    written = {str(p.relative_to(tmp_path / "out0")) for p in (tmp_path / "out0").rglob("*") if p.is_file()}
    assert {f"checkpoint-{STEPS}/model.safetensors", f"checkpoint-{STEPS}/optimizer.pt",
            f"checkpoint-{STEPS}/trainer_state.json", "distill_result.json"} <= written
    by_rank1 = {str(p.relative_to(tmp_path / "out1")) for p in (tmp_path / "out1").rglob("*") if p.is_file()}
    assert by_rank1 == {f"checkpoint-{STEPS}/rng_state_1.pth"}


def worker(folder: Path) -> None:
    """One torchrun process: distil a tiny kn-gpt2 student for a few steps, then record what it saw."""
    import copy

    import torch
    from conftest import build_tiny

    import kroncompress as kc
    from kroncompress.distill.trainer import distill
    from kroncompress.recipe import DistillConfig, TrainConfig

    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)

    class RecordingBlocks(torch.utils.data.Dataset):
        """Blocks whose values encode their index; remembers which ones this process read."""

        def __init__(self):
            self.seen: list[int] = []

        def __len__(self):
            return BLOCKS

        def __getitem__(self, index):
            self.seen.append(int(index))
            ids = (torch.arange(16) * 7 + index) % 127 + 1
            return {"input_ids": ids, "labels": ids.clone()}

    teacher = build_tiny("gpt2", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    student = copy.deepcopy(teacher)
    kc.compress(student, kc.load_recipe("kn-gpt2"))
    data = RecordingBlocks()
    config = DistillConfig(train=TrainConfig(batch_size=BATCH, max_steps=STEPS, lr=1e-3, save_every=STEPS))
    result = distill(student, teacher, config, data, output_dir=folder / f"out{rank}", progress=False, log_every=1)
    checksum = float(sum(p.detach().double().sum() for p in student.parameters()))
    record = {"rank": rank, "world_size": int(os.environ["WORLD_SIZE"]), "first_batch": data.seen[:BATCH],
              "seen": data.seen, "checksum": round(checksum, 8), "steps": result.steps, "tokens": result.tokens}
    (folder / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
