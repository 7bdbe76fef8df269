"""Which `transformers` versions kroncompress truly works with: one clean venv per version, a smoke run in each.

    python benchmarks/check_transformers_range.py --install-only 4.57.6 5.0.0 5.17.0 5.23.0 5.25.0   # pip only
    python benchmarks/check_transformers_range.py --quick 4.57.6 5.0.0 5.17.0 5.23.0 5.25.0   # tiny GPT-2, light
    flock /work/wt/heavy.lock python benchmarks/check_transformers_range.py 5.0.0 5.25.0   # the demo via the CLI
    python benchmarks/check_transformers_range.py --report-only     # rewrite the report from the cached cells

Not part of `make test` (it installs packages from the index; a few minutes per version). For each version:

1. a venv whose .pth adds this interpreter's site-packages (torch and the rest are reused, not copied);
   `pip install transformers==V <kroncompress's other requirements>` installs into the venv only what
   that transformers needs besides (an older huggingface_hub or tokenizers shadow the shared ones), and
   the kroncompress wheel built from this checkout goes in with --no-deps (the pin is what is tested);
2. from a folder outside the checkout: import, `kroncompress plan`, `compress --no-distill` of the demo,
   `compress --max-steps 2` (two ILKD steps through transformers' Trainer: embedding, attention, hidden
   and CE losses), `from_pretrained` of both folders after `import kroncompress` with a forward pass,
   and the Trainer-adapter tests (tests/test_trainer.py without the installed-version range check).

The venvs are kept in --venvs (default: the system temp folder's kroncompress-tf-venvs), so a second run
only reinstalls the wheel; `--install-only` prepares them (network, no CPU-heavy step). Each version's result
is cached in benchmarks/results/transformers-range/<version>.json; the report is
benchmarks/results/transformers_range.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CELLS = ROOT / "benchmarks" / "results" / "transformers-range"
REPORT = ROOT / "benchmarks" / "results" / "transformers_range.md"
SKIP = {".venv", ".git", ".site", "site", "runs", "build", "dist", ".pytest_cache", "__pycache__", "benchmarks"}
# optional packages of the shared environment that a venv must not see (unless its transformers requires them):
# transformers uses `kernels` when it is installed, and transformers 5.0 fails to import GPT-2 with the kernels
# 0.19 of the shared environment (ValueError in kernels' layer registry), an incompatibility of those two, not
# of kroncompress; 5.25 requires kernels 0.19, so it stays visible there
HIDDEN = ["kernels"]
STEPS = ["install", "import", "plan", "compress --no-distill", "distill 2 steps", "from_pretrained", "trainer tests"]
QUICK_STEPS = ["install", "import", "plan", "tiny: compress, 2 ILKD steps, save, from_pretrained", "trainer tests"]

# --quick: a tiny GPT-2 instead of the demo runs (seconds of CPU, no heavy lock needed)
TINY = """
import copy, sys, tempfile, torch, kroncompress as kc, transformers
from pathlib import Path
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from kroncompress.distill.trainer import distill
from kroncompress.recipe import DistillConfig, LossWeights, TrainConfig
assert Path(kc.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()), kc.__file__
torch.manual_seed(0)
config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=128, bos_token_id=0, eos_token_id=0,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
teacher = GPT2LMHeadModel(config).eval()
student = copy.deepcopy(teacher)
recipe = kc.load_recipe("kn-gpt2")
kc.compress(student, recipe)
losses = LossWeights(ce=1.0, hidden_mse=1.0, attention_kl=1.0, embedding_mse=1.0)
train = TrainConfig(batch_size=4, lr=3e-3, warmup_ratio=0.5, max_steps=2, seed=0)
data = torch.randint(1, 128, (16, 16), generator=torch.Generator().manual_seed(0))
out = Path(tempfile.mkdtemp())
result = distill(student, teacher, DistillConfig(losses=losses, train=train), data, output_dir=out / "run", progress=False)
assert result.steps == 2, result
kc.save_compressed(student.eval(), out / "saved", recipe=recipe)
x = torch.arange(16)[None]
with torch.no_grad():
    reference = student(x).logits
    loaded = AutoModelForCausalLM.from_pretrained(out / "saved")(x).logits
assert torch.equal(loaded, reference), (loaded - reference).abs().max()
print(f"transformers {transformers.__version__}: 2 ILKD steps, from_pretrained gives the same logits")
"""

LOAD = """
import sys, torch, kroncompress, transformers
from pathlib import Path
assert Path(kroncompress.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()), kroncompress.__file__
for folder in ("out", "out-distilled"):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        logits = model(torch.arange(16)[None]).logits
        reference = kroncompress.load_compressed(folder)(torch.arange(16)[None]).logits
    assert torch.isfinite(logits).all(), folder
    assert torch.equal(logits, reference), f"{folder}: from_pretrained differs from load_compressed"
    print(folder, type(model).__name__, tuple(logits.shape), "same logits as load_compressed")
"""


def run(command: list, cwd: Path, env: dict | None = None, timeout: float = 900) -> tuple[bool, str]:
    try:
        done = subprocess.run([str(part) for part in command], cwd=cwd, env=env, text=True, timeout=timeout,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s"
    return done.returncode == 0, done.stdout


def last_error(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or line.startswith(("error:", "FAILED", "E ")):
            return line[:300]
    return lines[-1][:300] if lines else ""


def build_wheel(tmp: Path) -> Path:
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=lambda folder, names: [
        name for name in names if name in SKIP or name.endswith(".egg-info")])
    code = f"from setuptools import build_meta as b; print(b.build_wheel({str(tmp)!r}))"
    ok, out = run([sys.executable, "-c", code], cwd=source)
    if not ok:
        raise SystemExit(f"wheel build failed: {last_error(out)}")
    return tmp / out.strip().splitlines()[-1]


def dependency_paths() -> list[str]:
    own = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    return list(dict.fromkeys(p for p in sys.path if p in own or p.rstrip(os.sep).endswith("site-packages")))


def other_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [r for r in project["dependencies"] if not r.replace(" ", "").lower().startswith("transformers")]


def _hide(venv: Path) -> None:
    """HIDDEN packages: an unimportable package of version 0.0.0 in the venv shadows the shared one."""
    purelib = next((venv / "lib").glob("python*/site-packages"))
    ok, out = run([venv / "bin" / "python", "-c", "import importlib.metadata as m; print(*m.requires('transformers'), "
                   "sep=chr(10))"], cwd=venv)
    required = {line.split(";")[0].split("<")[0].split(">")[0].split("=")[0].strip().lower()
                for line in out.splitlines() if ok and "extra ==" not in line}
    for name in HIDDEN:
        if name in required:  # a hard requirement of this transformers (5.25 needs kernels): leave it visible
            for stub in (purelib / name, purelib / f"{name}-0.0.0.dist-info"):
                shutil.rmtree(stub, ignore_errors=True)
            continue
        (purelib / name).mkdir(exist_ok=True)
        (purelib / name / "__init__.py").write_text(f"raise ImportError('{name} is hidden by check_transformers_range.py')\n")
        (purelib / f"{name}-0.0.0.dist-info").mkdir(exist_ok=True)
        (purelib / f"{name}-0.0.0.dist-info" / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.0\n")


def prepare(version: str, venvs: Path) -> tuple[Path, dict, bool, str]:
    """The venv of `version` with that transformers and what it needs installed: (venv, env, ok, pip's output)."""
    venv = venvs / f"transformers-{version}"
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}", HF_HUB_OFFLINE="1", PYTHONNOUSERSITE="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    ready = venv / "installed.txt"
    if ready.is_file():
        _hide(venv)
        return venv, env, True, ready.read_text()
    venvs.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(venv, ignore_errors=True)
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=venvs)
    purelib = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=venvs)[1].strip())
    (purelib / "zz_dependencies.pth").write_text("".join(f"{p}\n" for p in dependency_paths()))
    _hide(venv)
    env_install = {k: v for k, v in env.items() if k != "HF_HUB_OFFLINE"}
    ok, out = run([python, "-m", "pip", "install", "-q", f"transformers=={version}", *other_requirements()],
                  cwd=venvs, env=env_install)
    if ok:
        ready.write_text(out)
    return venv, env, ok, out


def check(version: str, wheel: Path, tmp: Path, venvs: Path, quick: bool = False) -> dict:
    cell: dict = {"transformers": version, "steps": {}, "python": platform.python_version(),
                  "mode": "quick" if quick else "full"}
    venv, env, ok, out = prepare(version, venvs)
    python = venv / "bin" / "python"
    purelib = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp)[1].strip())
    work = tmp / f"work-{version}"
    work.mkdir()
    kron = venv / "bin" / "kroncompress"
    pip = [python, "-m", "pip", "install", "-q"]
    data = ["--data", "shakespeare", "--eval-tokens", "1024"]
    cell["steps"]["install"] = ok
    if not ok:
        cell["errors"] = {"install": last_error(out)}
        cell["works"] = False
        return cell
    steps = [
        ("install", [*pip, "--no-deps", "--ignore-installed", "--force-reinstall", wheel], None),
        ("import", [python, "-c", "import kroncompress, transformers, huggingface_hub, tokenizers as t; "
                    "print(transformers.__version__, huggingface_hub.__version__, t.__version__, kroncompress.__file__)"],
         None),
        ("plan", [kron, "plan", "shakespeare-gpt2", "--recipe", "kn-gpt2"], None),
    ]
    if quick:
        steps += [
            ("tiny: compress, 2 ILKD steps, save, from_pretrained", [python, "-c", TINY], None),
            ("trainer tests", [python, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(ROOT / "tests/test_trainer.py"),
                               "-k", "each_loss_term or overrides_only or warmup"], None),
        ]
    else:
        steps += [
        ("compress --no-distill", [kron, "compress", "--recipe", "kn-gpt2", "-o", "out", "--no-distill", *data], None),
        ("distill 2 steps", [kron, "compress", "--recipe", "kn-gpt2", "-o", "out-distilled", "--max-steps", "2",
                             *data], None),
        ("from_pretrained", [python, "-c", LOAD], None),
        ("trainer tests", [python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-x", str(ROOT / "tests/test_trainer.py"),
                           "-k", "not installed_transformers_is_in_the_supported_range"], None),
    ]
    for name, command, _ in steps:
        if cell["steps"].get(name) is False:
            continue
        start = time.perf_counter()
        ok, out = run(command, cwd=work, env=env)
        cell["steps"][name] = ok
        cell.setdefault("seconds", {})[name] = round(time.perf_counter() - start + cell.get("seconds", {}).get(name, 0), 1)
        if name == "import" and ok:
            cell["installed"] = out.strip().splitlines()[-1]
        if name == "trainer tests":
            cell["tests"] = out.strip().splitlines()[-1] if out.strip() else ""
        if not ok:
            cell.setdefault("errors", {})[name] = last_error(out)
            print(f"  {version}: {name} FAILED: {last_error(out)}", flush=True)
            if name in ("install", "import"):
                break
        else:
            print(f"  {version}: {name} ok", flush=True)
    shadowed = run([python, "-m", "pip", "list", "--path", purelib, "--format", "freeze"], cwd=work, env=env)[1]
    cell["installed_in_venv"] = sorted(line for line in shadowed.split() if "==" in line and "kroncompress" not in line)
    cell["works"] = all(cell["steps"].get(step) for step in (QUICK_STEPS if quick else STEPS))
    return cell


def _table(cells: list[dict], steps: list[str]) -> list[str]:
    lines = ["| transformers | " + " | ".join(steps) + " | works | first failure |", "|---" * (len(steps) + 3) + "|"]
    for cell in sorted(cells, key=lambda c: tuple(int(x) for x in c["transformers"].split("."))):
        marks = ["ok" if cell["steps"].get(s) else ("FAIL" if s in cell["steps"] else "-") for s in steps]
        errors = cell.get("errors", {})
        first = next((f"{s}: {errors[s]}" for s in steps if s in errors), "")
        lines.append(f"| {cell['transformers']} | " + " | ".join(marks)
                     + f" | {'**yes**' if cell['works'] else 'no'} | {first.replace('|', '/')} |")
    return lines


def report(cells: list[dict]) -> str:
    pin = next(r for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
               if r.startswith("transformers"))
    lines = ["# transformers versions kroncompress works with", "",
             f"Made by `benchmarks/check_transformers_range.py` (a clean venv per version, torch reused; "
             f"Python {cells[0]['python'] if cells else '?'}; the shared environment's {', '.join(HIDDEN)} hidden "
             f"from the venvs whose transformers does not require it). The pin in pyproject.toml: `{pin}`.", ""]
    full = [c for c in cells if c.get("mode", "full") == "full"]
    quick = [c for c in cells if c.get("mode") == "quick"]
    if full:
        lines += ["## Full: the demo model through the CLI", "", *_table(full, STEPS), ""]
    if quick:
        lines += ["## Quick (`--quick`): a tiny GPT-2, all four ILKD losses through the Trainer", "",
                  *_table(quick, QUICK_STEPS), ""]
    lines += ["Packages pip put into each venv beside transformers (what that version needs other than the "
              "shared environment's):", ""]
    for cell in cells:
        lines.append(f"- {cell['transformers']} ({cell.get('mode', 'full')}): "
                     f"{', '.join(cell.get('installed_in_venv', [])) or 'none'}"
                     f"{'; trainer tests: ' + cell['tests'] if cell.get('tests') else ''}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="*", help="transformers versions to check, e.g. 4.57.6 5.0.0 5.25.0")
    parser.add_argument("--again", action="store_true", help="re-check versions that have a cached cell")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny GPT-2 instead of the demo runs (seconds of CPU per version)")
    parser.add_argument("--install-only", action="store_true", help="only prepare the venvs (pip, no smoke run)")
    parser.add_argument("--venvs", type=Path, default=Path(tempfile.gettempdir()) / "kroncompress-tf-venvs",
                        help="where the per-version venvs are kept between runs")
    args = parser.parse_args()
    CELLS.mkdir(parents=True, exist_ok=True)
    if args.install_only:
        for version in args.versions:
            ok, out = prepare(version, args.venvs)[2:]
            print(f"{version}: {'installed' if ok else 'install FAILED: ' + last_error(out)}", flush=True)
        return
    if not args.report_only and args.versions:
        tmp = Path(tempfile.mkdtemp(prefix="kroncompress-tf-"))
        try:
            wheel = build_wheel(tmp)
            for version in args.versions:
                target = CELLS / f"{version}{'-quick' if args.quick else ''}.json"
                if target.exists() and not args.again:
                    print(f"{version}: cached ({target})")
                    continue
                print(f"{version}: checking", flush=True)
                cell = check(version, wheel, tmp, args.venvs, args.quick)
                target.write_text(json.dumps(cell, indent=1) + "\n")
                print(f"{version}: {'works' if cell['works'] else 'does not work'}", flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    cells = [json.loads(path.read_text()) for path in sorted(CELLS.glob("*.json"))]
    REPORT.write_text(report(cells))
    print(f"wrote {REPORT}")


if __name__ == "__main__":
    main()
