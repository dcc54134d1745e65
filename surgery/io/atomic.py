"""Outputs that are complete or absent: written into a temporary directory, renamed into place.

`--force` replaces only what surgery wrote (`not_a_surgery_output`), never a directory holding the
current directory, the source or the run's own inputs; a run whose verification fails leaves the
previous output in place and goes to `<target>.failed`.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
from pathlib import Path

from ..errors import SurgeryError

TMP_PREFIX = ".surgery-tmp-"

REPORT = "surgery_report.json"  # in every output surgery writes (with or without verification): its marker


def not_a_surgery_output(directory: Path) -> str | None:
    """Why `--force` may not replace `directory` (None when it may): it must hold exactly an output surgery
    wrote, i.e. a surgery_report.json listing every other file in it, and nothing else."""
    try:
        doc = json.loads((directory / REPORT).read_text())
    except FileNotFoundError:
        return f"it holds no {REPORT}, so surgery did not write it"
    except (OSError, ValueError) as e:
        return f"its {REPORT} cannot be read ({getattr(e, 'strerror', None) or e})"
    files = next((doc[k] for k in ("files_blake3", "files_sha256") if isinstance(doc, dict) and isinstance(doc.get(k), dict)), None)
    if files is None or "surgery_version" not in doc:
        return f"its {REPORT} is not a surgery report"
    listed = set(files) | {REPORT}
    folders = {str(parent) for f in listed for parent in Path(f).parents if str(parent) != "."}
    for root, dirs, names in os.walk(directory):
        for name in sorted(dirs) + sorted(names):
            path = Path(root) / name
            rel = str(path.relative_to(directory))
            ok = rel in folders if path.is_dir() and not path.is_symlink() else rel in listed and not path.is_symlink()
            if not ok:
                return f"it holds {rel}, which surgery did not write"
    return None


def _make_temporary(parent: Path, prefix: str) -> Path:
    """mkdtemp's unique name with a plain mkdir's mode (0777 less the umask, as save_pretrained's), not 0700."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(path, 0o777)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(errno.EEXIST, "no unused temporary directory name", str(parent))


def _remove(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


class AtomicOutput:
    """A temporary directory beside the target, renamed into place only when complete.

    An existing target is replaced only with `force`, and only when it is empty or an output surgery
    wrote (`not_a_surgery_output`); never one that holds the current directory, the source or one of
    `inputs` ((what, path): the recipe, the verification data). Leftover temporary directories from
    killed runs are recognised by their prefix and removed by the next run that writes beside them.
    """

    def __init__(self, target: Path, force: bool, source: Path | None, inputs: tuple[tuple[str, Path], ...] = ()):
        if not str(target).strip() or Path(target).expanduser().resolve() == Path.cwd().resolve():
            raise SurgeryError("the output must be a directory path other than the current directory", where=f"output {str(target)!r}")
        self.target = Path(target).expanduser().absolute()
        self.force = force
        tgt = self.target.resolve()
        if source is not None:
            src = Path(source).resolve()
            if tgt == src or src in tgt.parents:
                raise SurgeryError("output must not be the source directory or inside it", where=str(self.target))
            if tgt in src.parents:
                raise SurgeryError("output must not contain the source directory", where=str(self.target))
        self.protected = (("the current directory", Path.cwd()),) + tuple(inputs)
        self.failed = self.target.with_name(f"{self.target.name}.failed")
        self._check_replaceable(self.target, "")
        if self.target.exists() and any(self.target.iterdir()):
            # a failed verification would go to TARGET.failed, replacing what is there
            self._check_replaceable(self.failed, f"a failed verification of {self.target} would be written here, but ")
        self.tmp: Path | None = None
        # Set when the finished output must not replace what is there (a run whose verification failed):
        # it then goes to `<target>.failed` and the previous output stays.
        self.keep_previous = False
        self.written_to = self.target

    def _check_replaceable(self, path: Path, why: str) -> None:
        """Refuse now what `_move_into_place` would have to delete and must not."""
        resolved = path.resolve()
        for label, p in self.protected:
            p = Path(p).resolve()
            if resolved == p or resolved in p.parents:
                raise SurgeryError(f"{why}output must not contain {label}", where=str(path))
        if path.is_symlink():  # renaming onto it replaced the link (or, dangling, failed once the weights were written)
            raise SurgeryError(f"{why}output is a symbolic link (to {os.readlink(path)}); name the directory itself",
                               where=str(path))
        if not path.exists():
            return
        if not path.is_dir():
            raise SurgeryError(f"{why}output exists and is not a directory", where=str(path))
        if not any(path.iterdir()):
            return
        problem = not_a_surgery_output(path)
        if not self.force:
            if problem is None:
                raise SurgeryError(f"{why}output directory holds a previous surgery output; pass --force to replace it",
                                   where=str(path))
            raise SurgeryError(f"{why}output directory is not empty and {problem}; choose another output "
                               f"(--force replaces only an output surgery wrote)", where=str(path))
        if problem is not None:
            raise SurgeryError(f"{why}--force replaces only an output surgery wrote, and {problem}; "
                               f"choose another output or move it away yourself", where=str(path))

    def __enter__(self) -> Path:
        parent = self.target.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            clean_stale_temporaries(parent)
            self.tmp = _make_temporary(parent, f"{TMP_PREFIX}{self.target.name}-{os.getpid()}-")
        except OSError as e:
            raise SurgeryError(f"cannot write the output: {e.strerror}", where=str(self.target)) from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                # a full disk (ENOSPC), a file size limit (EFBIG), a read-only or vanished directory
                what = exc.strerror or str(exc) or type(exc).__name__
                if exc.filename:
                    what += f" ({exc.filename})"
                raise SurgeryError(f"cannot write the output: {what}; nothing was written", where=str(self.target)) from None
            return
        if self.keep_previous and self.target.exists() and any(self.target.iterdir()):
            self.written_to = self.failed
        try:
            self._move_into_place(self.written_to)
        except SurgeryError:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        except OSError as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise SurgeryError(f"cannot move the finished output into place: {e.strerror}", where=str(self.written_to)) from None

    def _move_into_place(self, dest: Path) -> None:
        """Rename the temporary to `dest`. An empty `dest` is replaced by the rename itself (which fails if
        anything appeared in it meanwhile); a non-empty one is moved aside and checked again before it goes."""
        if not dest.exists() or (dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir())):
            os.rename(self.tmp, dest)
            return
        aside = dest.with_name(f"{TMP_PREFIX}{dest.name}-{os.getpid()}-old")
        os.rename(dest, aside)
        problem = "it is not a directory" if not aside.is_dir() else not_a_surgery_output(aside) if any(aside.iterdir()) else None
        if problem is not None:  # changed since the run began
            os.rename(aside, dest)
            raise SurgeryError(f"changed during the run: {problem}; nothing was replaced", where=str(dest))
        try:
            os.rename(self.tmp, dest)
        except OSError:
            os.rename(aside, dest)  # put the previous output back
            raise
        _remove(aside)


def clean_stale_temporaries(parent: Path) -> list[Path]:
    """Remove temporaries whose writing process no longer exists."""
    removed = []
    for p in parent.glob(f"{TMP_PREFIX}*"):
        try:
            pid = int(p.name[len(TMP_PREFIX):].rsplit("-", 2)[-2])
        except (ValueError, IndexError):
            continue
        if pid != os.getpid() and not _alive(pid):
            _remove(p)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
