"""Lazy imports: `import kroncompress`, `kroncompress --help` and `kroncompress recipes` load neither torch nor
transformers (each is checked in a fresh interpreter, by the modules loaded, not by time), and every public
name is still reachable as kc.X and `from kroncompress import X`."""

from __future__ import annotations

import subprocess
import sys

import pytest

import kroncompress as kc

HEAVY = ("torch", "transformers")


def _loaded_after(code: str) -> list[str]:
    """The heavy modules loaded after running `code` in a fresh interpreter."""
    probe = f"{code}\nimport sys\nprint('loaded:', *(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    last = done.stdout.splitlines()[-1].split()
    assert last[0] == "loaded:", done.stdout
    return last[1:]


def _cli(*args: str) -> str:
    return ("import sys\nfrom kroncompress.cli.main import main\n"
            f"try:\n    main({list(args)!r})\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n")


@pytest.mark.parametrize("code", [
    "import kroncompress",
    "import kroncompress as kc; kc.__version__; dir(kc)",
    "import kroncompress.recipe as r; r.list_recipes()",
    _cli("--help"),
    _cli("recipes"),
    _cli("recipes", "--json"),
    _cli("compress", "--help"),
], ids=["import", "version-dir", "list_recipes", "cli-help", "cli-recipes", "cli-recipes-json", "cli-compress-help"])
def test_light_entry_points_load_no_torch_or_transformers(code):
    assert _loaded_after(code) == []


def test_layers_and_the_distill_package_need_torch_but_not_transformers():
    assert _loaded_after("import kroncompress.layers, kroncompress.linalg, kroncompress.distill") == ["torch"]


def test_every_public_name_resolves():
    for name in kc.__all__:
        assert getattr(kc, name) is not None, name
    assert set(kc.__all__) <= set(dir(kc))
    from kroncompress import DistillResult, distill, nearest_kronecker  # noqa: F401

    assert distill.__name__ == "kroncompress.distill"  # the subpackage, not its engine function
    assert kc.distill.distill is kc.distill.trainer.distill
    assert kc.nearest_kronecker is nearest_kronecker


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kc.nope  # noqa: B018
    with pytest.raises(ImportError):
        exec("from kroncompress import nope", {})
