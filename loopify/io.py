"""Atomic writes: an output appears whole or not at all."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from loopify.errors import LoopifyError


@contextlib.contextmanager
def atomic_path(path: str | Path, *, directory: bool = False, need: int | None = None):
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    For ``directory=True`` the temporary path is a fresh directory and an existing directory at
    ``path`` is replaced. The temporary name carries this process's id, so that temporaries a
    killed run left beside the same target are swept here first (:func:`sweep_stale`).
    ``need``: bytes the output will take, checked against the free space before anything is
    written. A full disk (here or while writing) is one :class:`LoopifyError` naming the path
    and the space, and nothing is left behind.
    """
    path = Path(path)
    check_output(path, directory=directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    if need:
        check_space(path, need)
    prefix = temp_prefix(path)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
    try:
        try:
            yield tmp
        except Exception as e:
            if out_of_space(e):
                raise space_error(path, _bytes_in(tmp), need) from None
            raise
        _move_into_place(tmp, path, directory)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink()


def _move_into_place(tmp: Path, path: Path, directory: bool) -> None:
    if directory:
        replace_dir(tmp, path)
    else:
        os.replace(tmp, path)


def replace_dir(tmp: Path, path: Path) -> None:
    """Rename the directory ``tmp`` to ``path``, replacing a directory there. Two writers of one
    target at once both succeed, the later one's directory winning: a rename onto a directory
    that appeared meanwhile (ENOTEMPTY) moves that one aside and tries again."""
    for _ in range(5):
        old = None
        try:
            if path.exists():
                old = path.with_name(f"{temp_prefix(path)}old")
                shutil.rmtree(old, ignore_errors=True)
                path.rename(old)
            tmp.rename(path)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                raise
            continue
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return
    tmp.rename(path)


# ----------------------------------------------------------------------------------------------
# Output locations, full disks, stale temporaries


def check_output(path: str | Path, *, directory: bool = False, what: str = "output") -> Path:
    """Refuse, before any work, an output that cannot be written: a parent that is a file, a
    directory where a file goes (or the reverse), a location that is not writable (``/proc``,
    a read-only mount, no permission). Probes by creating and removing a temporary file in the
    nearest existing directory, which is what the write will need."""
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        kind = "a directory" if path.is_dir() else "a file"
        raise LoopifyError(f"{path}: the {what} is {kind}; give {'a directory' if directory else 'a file'} path")
    anc = path.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise LoopifyError(f"{path}: cannot write the {what}: {anc} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".loopify-probe-", dir=anc)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise LoopifyError(f"{path}: cannot write the {what} in {anc}: {e.strerror or e}") from None
    return path


def temp_prefix(path: Path) -> str:
    """``.NAME.PID.``: temporaries of ``path`` made by this process."""
    return f".{path.name}.{os.getpid()}."


_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?:[A-Za-z0-9_]+\.tmp|old)$")


def sweep_stale(path: Path) -> list[Path]:
    """Remove the temporaries a killed run left beside ``path`` (same target, made by a process
    that no longer exists); returns what was removed. Temporaries of live processes (another
    run writing the same target right now) are left alone."""
    removed = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        owners = _owners(p.name, path.name)
        if not owners or any(_alive(pid) for pid in owners):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _owners(name: str, target: str) -> list[int] | None:
    """The processes that made ``name``, if it is a temporary of ``target`` (also nested: the
    temporary of a temporary, as a compile writes its artifact inside its own), else None."""
    m = _STALE.match(name)
    if m is None:
        return None
    if m["name"] == target:
        return [int(m["pid"])]
    inner = _owners(m["name"], target) if m["name"].startswith(".") else None
    return inner + [int(m["pid"])] if inner else None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def out_of_space(e: BaseException) -> bool:
    """Whether ``e`` is a write failing for lack of space (errno, or a library's message:
    safetensors, the linker)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    text = str(e)
    return any(s in text for s in ("No space left on device", "StorageFull", "Disk quota exceeded",
                                   "File too large"))


def space_error(path: Path, written: int, need: int | None) -> LoopifyError:
    free = _free(path.parent) + written  # once the partial output is removed
    needed = f"needs about {need:,} bytes" if need else f"needs more than the {written:,} bytes written"
    return LoopifyError(f"{path}: no space left on the device: the output {needed}, {free:,} bytes are free in "
                        f"{path.parent}; nothing was written (free some space and run again)")


def check_space(path: Path, need: int) -> None:
    """Refuse in one line, before writing, an output of ``need`` bytes that does not fit."""
    if _free(path.parent) < need:
        raise space_error(path, 0, need)


def _free(d: Path) -> int:
    """Free bytes where ``d`` is (or will be: a directory not made yet is on its nearest existing
    ancestor's file system; reading a missing one as 0 refused every output in a new directory
    as a full disk)."""
    d = Path(d)
    while not d.exists() and d != d.parent:
        d = d.parent
    try:
        return shutil.disk_usage(d).free
    except OSError:
        return 0


def _bytes_in(p: Path) -> int:
    try:
        if p.is_dir():
            return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        return p.stat().st_size
    except OSError:
        return 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, obj) -> Path:
    """Write JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    return Path(path)


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def read_manifest_json(path: Path, fmt: str, error: type[LoopifyError]) -> dict:
    """The JSON manifest at ``path`` whose ``format`` is ``fmt``; anything else raises ``error``
    in one line (unreadable, not JSON, not an object, another format)."""
    try:
        manifest = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise error(f"{path}: not a {fmt} manifest")
    return manifest


def safetensors_header(f: str | Path) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets; and ``__metadata__``)
    and where its data starts; ValueError when the header is unreadable or points past the end
    of the file. Reads the header only."""
    size = Path(f).stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("file shorter than its 8-byte header length")
        n = int.from_bytes(head, "little")
        if n <= 0 or n > size - 8:
            raise ValueError("header length past the end of the file")
        header = json.loads(fh.read(n))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ValueError(f"file is {size} bytes, its header needs {8 + n + end}")
    return header, 8 + n


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or of a directory (every file's relative name and sha256, in order)."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()
