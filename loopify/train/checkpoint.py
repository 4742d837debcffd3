"""Checkpoints (atomic, on interrupt too) and an exact --resume."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import torch

from loopify.io import atomic_path
from loopify.train.config import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, RESUME_MAY_CHANGE, TrainConfig, TrainError


class StopFlag:
    """SIGINT/SIGTERM set a flag (the step in progress finishes, then a checkpoint is written); a
    second SIGINT raises KeyboardInterrupt at once. Handlers are installed only in the main thread."""

    def __init__(self):
        self.requested = False
        self.signal = None
        self._old = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._old[s] = signal.signal(s, self._handler)
                except (ValueError, OSError):  # pragma: no cover
                    pass
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


# ----------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: Path, state: dict) -> Path:
    """torch.save to a temporary file beside ``path``, then rename (atomic)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise TrainError(f"{path}: no checkpoint to resume from")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001
        raise TrainError(f"{path}: cannot read the checkpoint ({type(e).__name__}); it is truncated or not a loopify "
                         "training checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path}: not a loopify training checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise TrainError(f"{path}: checkpoint version {state.get('version')} is not supported")
    return state


def check_resumable(config: TrainConfig, state: dict, converted_sha: str, data_sha: str, path: Path) -> None:
    if state["converted_sha256"] != converted_sha:
        raise TrainError(f"{path}: the checkpoint belongs to another converted model (sha256 differs from {config.converted})")
    if state["data_sha256"] != data_sha:
        raise TrainError(f"{path}: the training data changed since the checkpoint (sha256 of {config.data} differs)")
    old, new = state["config"], config.to_dict()
    for k in sorted(new):
        if k in RESUME_MAY_CHANGE or k in ("converted", "data"):
            continue
        if old.get(k) != new[k]:
            raise TrainError(f"{path}: --resume with {k}={new[k]!r}, the checkpoint was made with {k}={old.get(k)!r}; "
                             f"only {', '.join(RESUME_MAY_CHANGE[:4])} ... may change")
    if state.get("world", 1) != _world_now():
        raise TrainError(f"{path}: the checkpoint was made with {state.get('world', 1)} processes, this run has "
                         f"{_world_now()}: the data order would change")


def _world_now() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


# ----------------------------------------------------------------------------------------------
