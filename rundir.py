"""The run directory: what a training process reads and writes there, checkpoints written atomically, resume.

A run directory (``train.py --out``) holds ``config.json`` (written once, complete), the final models
(``vqvae.keras``, ``pixelcnn.keras``, ``judge.keras``, each saved through a temporary file), one
whole-model checkpoint per completed epoch under ``checkpoints/<stage>/`` (weights and optimiser
state, ``epoch_NNNN.keras``, the last two kept), the history ``history_<stage>.csv`` and TensorBoard
logs under ``logs/<stage>/``. ``--resume`` restarts each stage from its newest checkpoint and drops the
history rows written after it, so no epoch is duplicated or missing.

In a multi-worker run every process saves (saving can read distributed variables, which takes all
workers), but only the chief writes into the run directory; :class:`RunDirs` says where each process
reads and writes. Nothing runs on import; Keras is imported by the functions that use it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

_CKPT = re.compile(r"^epoch_(\d{4,})\.keras$")


@dataclasses.dataclass
class RunDirs:
    """Where this process reads a run and where it writes it (the Keras/TF multi-worker convention).

    Attributes:
        out: the run directory (``--out``). Saved state is read from it: ``config.json``, the
            checkpoints a ``--resume`` restarts from, ``vqvae.keras`` for ``--stage prior``.
        write: where this process writes: ``out`` on the chief; on any other worker a temporary
            directory, removed at the end (:meth:`close`). Every worker must still save its checkpoints
            and models, but only the chief's copies are kept, so a run directory is never written by
            two processes.
        is_chief: the chief (the single process of a one-machine run) also evaluates, draws figures
            and writes ``metrics.json``.
    """

    out: Path
    write: Path
    is_chief: bool = True

    @classmethod
    def for_process(cls, out: Path, is_chief: bool = True, task: str = "") -> RunDirs:
        """The chief writes into ``out``; another worker (``task``, e.g. ``"worker1"``) into a fresh temp dir."""
        if is_chief:
            return cls(out, out, True)
        return cls(out, Path(tempfile.mkdtemp(prefix=f"train_{task}_")), False)

    def close(self) -> None:
        """Remove a non-chief worker's temporary directory (nothing on the chief)."""
        if not self.is_chief:
            shutil.rmtree(self.write, ignore_errors=True)

    def write_config(self, cfg: dict) -> Path:
        """Write ``config.json``: once per run, when it is complete."""
        import utils

        self.write.mkdir(parents=True, exist_ok=True)
        return utils.save_json(cfg, self.write / "config.json")

    def checkpoint_dir(self, stage: str) -> Path:
        return self.write / "checkpoints" / stage

    def history_csv(self, stage: str) -> Path:
        return self.write / f"history_{stage}.csv"

    def start_stage(self, stage: str, resume: bool) -> tuple[int, Path | None]:
        """``(completed epochs, checkpoint to restart from)`` for ``stage``.

        On ``resume`` that is the newest checkpoint in ``out`` (the chief's, the same for every worker),
        and this process's history keeps only the rows of the epochs it holds; otherwise ``(0, None)``
        and the stage's old checkpoints and history are removed.
        """
        done, ckpt = latest_checkpoint(self.out / "checkpoints" / stage) if resume else (0, None)
        if not resume:
            shutil.rmtree(self.checkpoint_dir(stage), ignore_errors=True)
            self.history_csv(stage).unlink(missing_ok=True)
        truncate_history(self.history_csv(stage), done)
        return done, ckpt

    def callbacks(self, stage: str) -> list:
        """The stage's history (``CSVLogger``), per-epoch checkpoint and TensorBoard callbacks, in that order:
        an epoch's history row is written before its checkpoint."""
        import keras

        return [keras.callbacks.CSVLogger(str(self.history_csv(stage)), append=True),
                _atomic_checkpoint_class()(self.checkpoint_dir(stage)),
                keras.callbacks.TensorBoard(log_dir=str(self.write / "logs" / stage), write_graph=False)]


def latest_checkpoint(ckpt_dir: Path) -> tuple[int, Path | None]:
    """``(completed epochs, path)`` of the newest complete checkpoint, or ``(0, None)``.

    Only files named ``epoch_NNNN.keras`` count; they appear by ``os.replace`` once fully written,
    so a process killed mid-write leaves a temporary file that is never taken as the latest.
    """
    if not ckpt_dir.is_dir():
        return 0, None
    found = sorted((int(m.group(1)), ckpt_dir / name) for name in os.listdir(ckpt_dir)
                   if (m := _CKPT.match(name)))
    return found[-1] if found else (0, None)


def _atomic_checkpoint_class():
    import keras

    class AtomicCheckpoint(keras.callbacks.Callback):
        """Save the whole model after every epoch to ``epoch_NNNN.keras`` through a temp file.

        The history row of an epoch is written (by ``CSVLogger``, earlier in the callback list) before
        its checkpoint; on resume, rows past the checkpoint are dropped, so no epoch is duplicated or
        missing. A NaN loss stops training (``TerminateOnNaN``) and its epoch is never checkpointed.
        """

        def __init__(self, ckpt_dir: Path, keep: int = 2):
            super().__init__()
            self.ckpt_dir, self.keep = Path(ckpt_dir), keep

        def on_epoch_end(self, epoch, logs=None):
            if logs and any(not np.isfinite(v) for v in logs.values() if isinstance(v, (int, float))):
                return
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.ckpt_dir / f"tmp_{os.getpid()}.keras"
            self.model.save(tmp)
            os.replace(tmp, self.ckpt_dir / f"epoch_{epoch + 1:04d}.keras")
            done = sorted(int(m.group(1)) for n in os.listdir(self.ckpt_dir) if (m := _CKPT.match(n)))
            for old in done[:-self.keep]:
                (self.ckpt_dir / f"epoch_{old:04d}.keras").unlink(missing_ok=True)

    return AtomicCheckpoint


def truncate_history(csv_path: Path, completed_epochs: int) -> None:
    """Keep only the history rows of epochs ``< completed_epochs`` (rewritten atomically)."""
    import utils

    if not csv_path.exists():
        return
    lines = csv_path.read_text().splitlines()
    if not lines:
        return
    kept = [lines[0]] + [ln for ln in lines[1:] if ln and int(float(ln.split(",")[0])) < completed_epochs]
    utils.atomic_write_bytes(csv_path, ("\n".join(kept) + "\n").encode() if completed_epochs else b"")


def weights_digest(model) -> str:
    """SHA-256 (first 16 hex digits) of all of ``model``'s weights, trainable and not, in order.

    Printed when a stage's model is saved, so the workers of a multi-worker run can be seen to hold
    bit-identical models.
    """
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()[:16]


def save_final(model, path: Path, stage: str) -> None:
    """Save a final ``.keras`` model atomically and print its weights' digest."""
    tmp = path.with_name(f"tmp_{os.getpid()}_{path.name}")
    model.save(tmp)
    os.replace(tmp, path)
    print(f"[{stage}] saved {path.name} (weights sha256 {weights_digest(model)})")
