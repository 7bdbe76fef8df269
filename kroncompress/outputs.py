"""Output-folder safety: refuse dangerous paths, replace only folders kroncompress wrote, lock for the run.

    with claim_output("runs/kn", overwrite=False, sources=["./gpt2"], style="cli") as target:
        ...   # write into target; a second claim of the same folder fails at once

`claim_output` runs every check that needs no model, in this order, before any work:

1. the path: not empty (an unset shell variable), not the current folder or one of its ancestors, not
   the home folder or `/`, not a folder that holds one of the run's inputs (`sources`), not a file;
2. what is there: a finished run is replaced only with `overwrite`, an unfinished one (`checkpoints/`)
   only with `overwrite` or continued with `resume`; `overwrite` never replaces a folder kroncompress
   did not write (`written_by_kroncompress`): the user's own files are never deleted;
3. writable: the parent folder is created and must accept the lock file `.<name>.lock`, which is held
   with `fcntl.flock` for the whole run (a second run on the same output is refused at once);
4. leftovers of an interrupted save next to the output (`.<name>.tmp-<hex8>` folders) are removed, and
   a `.<name>.old-<hex8>` backup is put back when the kill came between its two renames.

Every refusal is an `OutputError` (a ValueError) whose one-line message names the folder and the fix,
with the flag names of the caller's `style`: "cli" (`--overwrite`) or "api" (`overwrite=True`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from kroncompress.errors import OutputError, OutputExistsError

logger = logging.getLogger(__name__)

CONFIG_KEY = "kroncompress"  # the config.json section a compressed folder carries (surgery.CONFIG_KEY)
MARKER = ".kroncompress"  # written into folders that have no config section (dense exports)
CHECKPOINTS = "checkpoints"
_CHECKPOINT = re.compile(r"^checkpoint-\d+$")
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[0-9a-f]{8}$")  # io.save_compressed / export_dense


# files the distillation engine keeps beside its checkpoint-N folders (checkpoints.SETTINGS_NAME, trainer.RESULT_NAME)
RUN_FILES = ("run_settings.json", "distill_result.json")


_FLAGS = {
    "cli": {"overwrite": "--overwrite", "resume": "--resume", "output": "--output"},
    "api": {"overwrite": "overwrite=True", "resume": "resume=True", "output": "output_dir"},
}


def _flag(style: str, name: str) -> str:
    return _FLAGS.get(style, _FLAGS["api"])[name]


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(path)))).resolve()


# -- 1. the path ---------------------------------------------------------------------------------

def check_output_path(output: str | os.PathLike, sources: Iterable[str | os.PathLike] = (), style: str = "api") -> Path:
    """The output path, or OutputError when writing there could destroy something (see the module docs).

    `sources` are the run's inputs (model folder, data files, recipe file); those that are not existing
    paths (hub ids, corpus names) are ignored.
    """
    flag = _flag(style, "output")
    text = str(output)
    if not text.strip():
        raise OutputError(f"{flag} is empty (an unset shell variable?); give a new folder path, e.g. runs/kn-gpt2")
    path = Path(text).expanduser()
    where = _resolved(path)
    if where == Path.home().resolve() or where == Path(where.anchor):
        what = "the home folder" if where == Path.home().resolve() else "the root folder"
        raise OutputError(f"{flag} {text!r} is {what}; give a new folder, e.g. runs/kn-gpt2")
    cwd = Path.cwd().resolve()
    if where == cwd or where in cwd.parents:
        what = "the current folder" if where == cwd else "a folder that contains the current folder"
        raise OutputError(f"{flag} {text!r} is {what}; kroncompress writes (and with overwrite replaces) the whole "
                          f"output folder: give a new folder, e.g. runs/kn-gpt2")
    for source in sources:
        if source is None or not str(source).strip():
            continue
        try:
            if not os.path.exists(os.path.expanduser(str(source))):
                continue
        except (OSError, ValueError):
            continue
        held = _resolved(source)
        if where == held or where in held.parents:
            raise OutputError(f"{flag} {text!r} holds the input {str(source)!r}; writing there could replace it: "
                              "give a new folder for the output")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {text!r} exists and is a file; give a folder path")
    return path


# -- 2. what is there ----------------------------------------------------------------------------

def written_by_kroncompress(folder: str | os.PathLike) -> bool:
    """Whether `folder` is one kroncompress wrote: a compressed folder (config.json with a `kroncompress`
    section), a dense export (the `.kroncompress` marker), or an unfinished run (only `checkpoints/`
    with `checkpoint-N` folders). An empty folder counts too: replacing it loses nothing."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    entries = {entry.name for entry in folder.iterdir()}
    if not entries or MARKER in entries:
        return True
    config = folder / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict) and isinstance(data.get(CONFIG_KEY), dict):
            return True
    checkpoints = folder / CHECKPOINTS
    if entries == {CHECKPOINTS} and checkpoints.is_dir() and not checkpoints.is_symlink():
        return all((_CHECKPOINT.match(entry.name) and entry.is_dir()) or (entry.name in RUN_FILES and entry.is_file())
                   for entry in checkpoints.iterdir())
    return False


def check_output_state(path: Path, *, overwrite: bool = False, resume: bool = False, style: str = "api") -> None:
    """OutputError when the existing `path` must not be written: a finished run without overwrite, an
    unfinished one without resume or overwrite, a non-empty folder kroncompress did not write."""
    if not path.exists():
        return
    text, over, again = str(path), _flag(style, "overwrite"), _flag(style, "resume")
    if not any(path.iterdir()):
        return
    ours = written_by_kroncompress(path)
    if not ours:
        flags = f" ({over} and {again} only touch kroncompress's own folders)"
        raise OutputExistsError(f"output folder {text!r} already exists and holds files kroncompress did not write (no "
                          f"config.json with a {CONFIG_KEY!r} section, no {MARKER} marker, no {CHECKPOINTS}/ of a run)"
                          f"{flags if overwrite or resume else ''}: give a new folder, or empty it yourself")
    if overwrite:
        return
    if (path / "config.json").is_file():
        raise OutputExistsError(f"output folder {text!r} already holds a finished run; pass {over} to replace it, "
                          "or give a new folder")
    if resume:
        return
    if (path / CHECKPOINTS).is_dir():
        raise OutputExistsError(f"output folder {text!r} holds an unfinished run ({CHECKPOINTS}/); pass {again} to "
                          f"continue it, {over} to start again, or give a new folder")
    raise OutputExistsError(f"output folder {text!r} already exists; pass {over} to replace it, or give a new folder")


# -- 3. writable and locked ----------------------------------------------------------------------

def lock_path(path: Path) -> Path:
    """The lock file of an output folder: `.<name>.lock` next to it."""
    return path.parent / f".{path.name}.lock"


def _output(path: Path, style: str) -> str:
    """How an error names the output folder: `--output 'runs/x'` (CLI) or `output_dir 'runs/x'` (API)."""
    return f"{_flag(style, 'output')} {str(path)!r}"


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


UNWRITABLE = "give a folder you can write to"  # the fix of every refused write


@contextlib.contextmanager
def _locked(path: Path, style: str) -> Iterator[None]:
    import fcntl

    lock = lock_path(path)
    while True:
        try:
            handle = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot write the lock file {lock.name} into {str(path.parent)!r} ({_reason(exc)})",
                              where=_output(path, style), fix=UNWRITABLE) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(handle, 64, 0).decode("ascii", "replace").strip()
            os.close(handle)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputError(f"output folder {str(path)!r} is in use by another kroncompress run"
                                  f"{f' (pid {holder})' if holder.isdigit() else ''}, which holds {str(lock)!r}; "
                                  "wait for it to finish, or give another folder") from None
            raise OutputError(f"cannot lock {str(lock)!r} ({_reason(exc)})", where=_output(path, style), fix=UNWRITABLE) from None
        try:  # the file may have been unlinked by the run that just released it: lock the one on disk
            same = os.stat(lock).st_ino == os.fstat(handle).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(handle)
    try:
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still holding it: a waiter re-checks the inode above
        os.close(handle)


def _check_writable_inside(path: Path, style: str) -> None:
    """An existing output is written into (checkpoints, resume): try creating a file there."""
    import tempfile

    if not path.is_dir():
        return
    try:
        with tempfile.TemporaryFile(dir=path, prefix=".kroncompress-probe-"):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write into it ({_reason(exc)})", where=_output(path, style), fix=UNWRITABLE) from None


# -- 4. leftovers of an interrupted save ---------------------------------------------------------

def clean_leftovers(path: Path) -> list[str]:
    """Remove `.<name>.tmp-<hex8>` folders next to `path` (a save killed before its final rename) and put
    back a `.<name>.old-<hex8>` backup when `path` itself is missing (killed between the two renames;
    otherwise the backup is stale and removed). Only these names are touched. Returns what was done."""
    done: list[str] = []
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return done
    for entry in sorted(parent.iterdir()):
        match = _LEFTOVER.match(entry.name)
        if not match or match["name"] != path.name or entry.is_symlink() or not entry.is_dir():
            continue
        if match["kind"] == "old" and not path.exists():
            os.replace(entry, path)
            done.append(f"restored {entry.name} as {path.name} (a save was interrupted between its renames)")
            continue
        shutil.rmtree(entry, ignore_errors=True)
        done.append(f"removed {entry.name} (left by an interrupted save)")
    for line in done:
        logger.warning("%s: %s", path, line)
    return done


@contextlib.contextmanager
def claim_output(output: str | os.PathLike, *, overwrite: bool = False, resume: bool = False,
                 sources: Iterable[str | os.PathLike] = (), style: str = "api", lock: bool = True) -> Iterator[Path]:
    """Check `output` (see the module docs), lock it, clean leftovers, and yield it as a Path.

    Raises OutputError before anything is written. `lock=False` only checks (other ranks of a
    multi-process run, which do not write). The lock is released (and its file removed) on exit.
    """
    path = check_output_path(output, sources, style)
    check_output_state(path, overwrite=overwrite, resume=resume, style=style)
    if not lock:
        yield path
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create its parent folder {str(path.parent)!r} ({_reason(exc)})", where=_output(path, style),
                          fix=UNWRITABLE) from None
    with _locked(path, style):
        check_output_state(path, overwrite=overwrite, resume=resume, style=style)  # changed while we waited?
        if path.exists():
            _check_writable_inside(path, style)
        clean_leftovers(path)
        yield path


def mark_output(path: str | os.PathLike, command: str) -> None:
    """Write the `.kroncompress` marker into a folder kroncompress just wrote (so a later `--overwrite` may
    replace it): needed where config.json has no kroncompress section, e.g. dense exports."""
    (Path(path) / MARKER).write_text(json.dumps({"written_by": f"kroncompress {command}"}) + "\n", encoding="utf-8")


def match_file_mode(path: str | os.PathLike, like: str | os.PathLike) -> None:
    """Give `path` the permission bits of `like` (a file written the ordinary way, so under the umask).
    safetensors writes its files 0600 whatever the umask; the rest of a saved folder is 0644 under the
    usual umask 022."""
    os.chmod(path, os.stat(like).st_mode & 0o777)
