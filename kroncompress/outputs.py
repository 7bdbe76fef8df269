"""Output-folder safety: refuse dangerous paths, replace only folders kroncompress wrote, lock for the run.

    with claim_output("runs/kn", overwrite=False, sources=["./gpt2"], style="cli") as target:
        ...   # write into target; a second claim of the same folder fails at once

`claim_output` runs every check that needs no model, in this order, before any work:

1. the path: not empty (an unset shell variable), not the current folder or one of its ancestors, not
   the home folder or `/`, not a folder that holds one of the run's inputs (`sources`), not a file, not
   a symbolic link (the final rename would replace the link, not the folder it points to);
2. what is there: a finished run is replaced only with `overwrite`, an unfinished one (`checkpoints/`)
   only with `overwrite` or continued with `resume`; `overwrite` never replaces a folder kroncompress
   did not write (`written_by_kroncompress`), nor one holding anything kroncompress did not write
   (`foreign_entries`: not in the folder's `.kroncompress` manifest): the user's own files are never deleted;
3. writable: the parent folder is created and must accept the lock file `.<name>.lock`, which is held
   with `filelock` for the whole run (a second run on the same output is refused at once, on any OS);
4. leftovers of an interrupted save next to the output (`.<name>.tmp-<hex8>` folders) are removed, and
   a `.<name>.old-<hex8>` backup is put back when the kill came between its two renames.

Every save goes through `replace_folder`: the whole folder is written next to the output, gets its
manifest (`write_manifest`: every entry kroncompress wrote) and is renamed into place, the same
ownership rule checked again at that moment.

Every refusal is an `OutputError` (a ValueError) whose one-line message names the folder and the fix,
with the flag names of the caller's `style`: "cli" (`--overwrite`) or "api" (`overwrite=True`).
"""

from __future__ import annotations

import contextlib
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
    if path.is_symlink():
        raise OutputError(f"{flag} {text!r} is a symbolic link (to {os.readlink(path)!r}); kroncompress replaces its output "
                          f"folder as a whole, which would replace the link, not the folder it points to: give that "
                          f"folder itself ({str(_resolved(path))!r}) or a new folder")
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


# what kroncompress writes into a folder: a folder written before the manifest is judged by these names
_KNOWN_NAMES = frozenset({
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
    "recipe.yaml", "report.json", "README.md", "task.json", "finetune.json", "score.png", "perplexity.png",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "vocab.txt", "merges.txt",
    "added_tokens.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json",
})
_KNOWN_PATTERN = re.compile(r"^model-\d+-of-\d+\.safetensors$")


def _manifest(folder: Path) -> set[str] | None:
    """The entries the `.kroncompress` marker lists as written by kroncompress (None: no list, an older folder)."""
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    return {str(name) for name in files} if isinstance(files, list) else None


def _run_checkpoints(entry: Path) -> bool:
    """A `checkpoints/` folder of a distillation run: only checkpoint-N folders, the run's own files and the
    Trainer's `runs/` logs (report_to tensorboard)."""
    return entry.is_dir() and not entry.is_symlink() and all(
        (_CHECKPOINT.match(item.name) and item.is_dir()) or (item.name in RUN_FILES and item.is_file())
        or (item.name == "runs" and item.is_dir() and not item.is_symlink())
        for item in entry.iterdir())


def foreign_entries(folder: str | os.PathLike) -> list[str]:
    """Entries of `folder` kroncompress did not write (folders end with '/'): not listed in its `.kroncompress`
    manifest, or, in a folder written before the manifest, not a name kroncompress writes. These are never
    replaced or deleted: `overwrite` refuses a folder that holds any."""
    folder = Path(folder)
    listed = _manifest(folder)
    out = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if name == MARKER or (name == CHECKPOINTS and _run_checkpoints(entry)):
            continue
        if (name in listed) if listed is not None else (name in _KNOWN_NAMES or _KNOWN_PATTERN.match(name)):
            continue
        out.append(name + ("/" if entry.is_dir() and not entry.is_symlink() else ""))
    return out


def _refuse_foreign(path: Path, foreign: list[str], style: str) -> None:
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    raise OutputExistsError(f"output folder {str(path)!r} holds {shown}, which kroncompress did not write; "
                            f"{_flag(style, 'overwrite')} replaces only what kroncompress wrote: move them out of the "
                            "folder, or give a new folder")


def write_manifest(folder: str | os.PathLike, command: str) -> None:
    """Write the `.kroncompress` marker of a folder kroncompress has just written (before it is renamed into
    place): which command wrote it and every entry it holds, the only ones a later `overwrite` may replace."""
    folder = Path(folder)
    files = sorted(entry.name for entry in folder.iterdir() if entry.name != MARKER)
    (folder / MARKER).write_text(json.dumps({"written_by": f"kroncompress {command}", "files": files}) + "\n",
                                 encoding="utf-8")


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
    if overwrite or resume:
        foreign = foreign_entries(path)
        if foreign:
            _refuse_foreign(path, foreign, style)
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
    from filelock import FileLock, Timeout

    lock = lock_path(path)
    while True:
        # our own handle on the lock file: it reads the holder's pid, writes ours, and pins the file's identity
        try:
            handle = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot write the lock file {lock.name} into {str(path.parent)!r} ({_reason(exc)})",
                              where=_output(path, style), fix=UNWRITABLE) from None
        try:
            holder = os.read(handle, 64).decode("ascii", "replace").strip()
        except OSError:  # Windows: the holder's lock covers the file's first byte
            holder = ""
        held = FileLock(str(lock), timeout=0)
        try:
            held.acquire()
        except Timeout:
            os.close(handle)
            raise OutputError(f"output folder {str(path)!r} is in use by another kroncompress run"
                              f"{f' (pid {holder})' if holder.isdigit() else ''}, which holds {str(lock)!r}; "
                              "wait for it to finish, or give another folder") from None
        except OSError as exc:
            os.close(handle)
            raise OutputError(f"cannot lock {str(lock)!r} ({_reason(exc)})", where=_output(path, style), fix=UNWRITABLE) from None
        # the run that just released may have removed the file (below) after we opened it: the lock counts only
        # on the file the path names now (an open handle keeps its inode from being reused)
        try:
            same = os.stat(lock).st_ino == os.fstat(handle).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        held.release()
        os.close(handle)
    try:
        with contextlib.suppress(OSError):  # the pid is a hint for the message above; Windows may refuse it
            os.ftruncate(handle, 0)
            os.lseek(handle, 0, os.SEEK_SET)
            os.write(handle, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still holding it: a waiter re-checks the file above (Windows refuses: below)
        held.release()
        os.close(handle)
        if os.name == "nt":
            with contextlib.suppress(OSError):
                os.unlink(lock)


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
        if not match or match["name"] != path.name or not (entry.is_dir() or entry.is_symlink()):
            continue
        if match["kind"] == "old" and not path.exists() and not path.is_symlink():
            os.replace(entry, path)
            done.append(f"restored {entry.name} as {path.name} (a save was interrupted between its renames)")
            continue
        if entry.is_symlink():  # an older kroncompress renamed an --output link: removing a link deletes no data
            entry.unlink()
        elif match["kind"] == "old" and foreign_entries(entry):
            done.append(f"kept {entry.name}: it holds files kroncompress did not write ({', '.join(foreign_entries(entry))})")
            continue
        else:
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
    """Write the `.kroncompress` manifest into a folder kroncompress just wrote (see `write_manifest`)."""
    write_manifest(path, command)


def replace_folder(tmp: str | os.PathLike, target: str | os.PathLike, *, overwrite: bool = False,
                   command: str = "save") -> Path:
    """Move the finished folder `tmp` (written next to `target`) into place with a rename, so a reader sees
    the whole folder or none of it. Everything the run writes must be in `tmp` before: its manifest
    (`write_manifest`) is written here, and its safetensors files get the mode of the folder's other files.

    An existing `target` is replaced only if it is empty, or with `overwrite` when kroncompress wrote it and
    everything in it (`foreign_entries`); it is renamed to `.<name>.old-<hex8>` first, removed afterwards.
    OutputError otherwise (nothing is moved or deleted; the caller removes `tmp`)."""
    import uuid

    tmp, target = Path(tmp), Path(target)
    write_manifest(tmp, command)
    for weights in tmp.rglob("*.safetensors"):
        match_file_mode(weights, tmp / MARKER)  # safetensors writes 0600 whatever the umask
    if target.is_symlink():
        raise OutputError(f"output folder {str(target)!r} is a symbolic link; give the folder it points to, or a new one")
    if target.exists():
        if not target.is_dir():
            raise OutputExistsError(f"output folder {str(target)!r} is a file; give a folder path")
        if any(target.iterdir()):
            if not overwrite:
                raise OutputExistsError(f"output folder {str(target)!r} appeared while saving; pass overwrite=True "
                                        "(--overwrite) to replace it, or give a new folder")
            if not written_by_kroncompress(target):
                raise OutputExistsError(f"output folder {str(target)!r} holds files kroncompress did not write; give a "
                                        "new folder, or empty it yourself")
            foreign = foreign_entries(target)
            if foreign:
                _refuse_foreign(target, foreign, "api")
        backup = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, backup)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(backup, target)
            raise
        shutil.rmtree(backup, ignore_errors=True)
        return target
    os.replace(tmp, target)
    return target


def match_file_mode(path: str | os.PathLike, like: str | os.PathLike) -> None:
    """Give `path` the permission bits of `like` (a file written the ordinary way, so under the umask).
    safetensors writes its files 0600 whatever the umask; the rest of a saved folder is 0644 under the
    usual umask 022."""
    os.chmod(path, os.stat(like).st_mode & 0o777)
