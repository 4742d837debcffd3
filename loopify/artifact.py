"""Compiled artifacts on disk: a directory with a library, parameters and a manifest.

Layout::

    ARTIFACT/
      lib.so               compiled Relax VM executable (host / aarch64 / CUDA host + fatbin)
      params.safetensors   the parameters, each stored once (deduplicated across stages)
      inputs.safetensors   the example inputs, by input name (what validation ran on)
      manifest.json        what the files are and how to call them (see :data:`FORMAT`)
      tuning/              optional: the MetaSchedule database the build used

The directory is written atomically: built under a temporary name beside the destination, then
renamed into place, so a reader never sees half an artifact. Reading checks the format, the
version and the sha256 of every listed file before anything is loaded.

Nothing here imports TVM or torch.export; the runtime (:mod:`loopify.runtime`) reads artifacts
with this module.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from loopify.errors import LoopifyError
from loopify.io import read_manifest_json, sha256_file

FORMAT = "loopify-artifact"
VERSION = 1
MANIFEST = "manifest.json"
LIBRARY = "lib.so"
PARAMS = "params.safetensors"
#: the example inputs the artifact was validated on (input name -> array), so that it runs
#: out of the box (``loopify run ARTIFACT`` without ``--inputs``)
EXAMPLE_INPUTS = "inputs.safetensors"


class ArtifactError(LoopifyError):
    """An artifact is missing, corrupt, of an unsupported version, or built for another target."""


class LoopCountError(LoopifyError):
    """A loop count outside the range the artifact's manifest allows."""


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write(dest, populate, manifest: dict) -> Path:
    """Write an artifact directory atomically.

    Args:
        dest: the artifact directory to create (replaced if it exists).
        populate: ``populate(tmp_dir)`` writes the files (library, params, ...) into ``tmp_dir``.
        manifest: the manifest without ``files``; the sha256 of every file is added here.

    Returns:
        The artifact path.
    """
    from loopify.io import check_output, out_of_space, replace_dir, space_error, sweep_stale, temp_prefix

    dest = Path(dest).absolute()
    check_output(dest, directory=True, what="artifact")
    dest.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(dest)  # what a killed compile of the same target left
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(dest), suffix=".tmp", dir=dest.parent))
    try:
        populate(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; an artifact is meant to be shared
        for p in _all_files(tmp):
            os.chmod(p, 0o755 if p.suffix == ".so" else 0o644)
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in _all_files(tmp)}
        manifest = dict(manifest, format=FORMAT, version=VERSION, files=files)
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        replace_dir(tmp, dest)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and out_of_space(e):
            raise space_error(dest, 0, None) from None
        raise
    return dest


def read_manifest(path, *, verify: bool = True) -> dict:
    """Read and check an artifact's manifest (and, with ``verify``, every file's sha256).

    Raises:
        ArtifactError: one line naming the artifact and what is wrong with it.
    """
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(f"{root}: not an artifact directory (does not exist or is a file)")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{root}: no {MANIFEST}; not a loopify artifact or an incomplete copy")
    manifest = read_manifest_json(mpath, FORMAT, ArtifactError)
    if manifest.get("version") != VERSION:
        raise ArtifactError(f"{mpath}: artifact version {manifest.get('version')!r}, this loopify "
                            f"reads version {VERSION}; rebuild the artifact")
    files = manifest.get("files")
    needed = libraries(manifest) + [PARAMS]
    if not isinstance(files, dict) or any(n not in files for n in needed):
        raise ArtifactError(f"{mpath}: manifest lists no {' / '.join(needed)}")
    if verify:
        for name, digest in files.items():
            p = inside(root, name, mpath)
            if not p.is_file():
                raise ArtifactError(f"{root}: file {name} listed in the manifest is missing")
            if sha256_file(p) != digest:
                raise ArtifactError(f"{root}: {name} is corrupt or was modified "
                                    f"(sha256 does not match the manifest)")
    return manifest


def libraries(manifest: dict) -> list[str]:
    """The compiled libraries an artifact holds: ``lib.so`` (one forward at fixed shapes), or a
    generation artifact's ``prefill.so`` and ``decode.so``."""
    entries = (manifest.get("generation") or {}).get("entries")
    return list(entries.values()) if entries else [LIBRARY]


def inside(root: Path, name: str, manifest_path: Path) -> Path:
    """``root / name``, refused when the manifest's entry is absolute or leaves the directory
    (a manifest must never make the loader read elsewhere)."""
    p = (root / name).resolve()
    if Path(name).is_absolute() or root.resolve() not in p.parents:
        raise ArtifactError(f"{manifest_path}: file entry {name!r} is not a file inside the artifact")
    return p


def loop_counts(manifest: dict, loops) -> list[int]:
    """Resolve a user's ``loops`` (None, an int, or one int per loop stage) against the manifest.

    Raises:
        LoopCountError: wrong number of counts, or a count outside [min, max].
    """
    specs = manifest.get("loops", [])
    if loops is None:
        counts = [int(s["default"]) for s in specs]
    elif isinstance(loops, int):
        counts = [int(loops)] * len(specs)
        if not specs and loops is not None:
            raise LoopCountError("this artifact has no loop stage; do not pass loops")
    else:
        counts = [int(k) for k in loops]
        if len(counts) != len(specs):
            raise LoopCountError(f"this artifact has {len(specs)} loop stage(s), got {len(counts)} "
                                 "loop counts")
    for k, s in zip(counts, specs):
        lo, hi = s.get("min", 0), s.get("max")
        if k < lo or (hi is not None and k > hi):
            rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise LoopCountError(f"loop count {k} for stage {s['stage']} ({s.get('name', '')}) is "
                                 f"outside the artifact's range {rng}")
    return counts
