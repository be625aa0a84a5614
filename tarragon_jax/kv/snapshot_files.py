"""The checkpoint store's Orbax files: where they go, and the Orbax calls that write and read them.

One checkpoint per flush window and AW, `directory/aw{aw}/{seq:08d}`, holding one array
`{"blocks": [n, L, parts, page_size, kv, hd]}`: one save per window and one leaf per save keep
Orbax's per-save and per-leaf host cost (a pytree of every block took ~12% of a core at batch 96
on the tiny model) off the decode loop. Compression is off by default: KV values barely compress
(random-like mantissas) and zstd would take host CPU from the engine thread.
"""
from __future__ import annotations

import tempfile
import threading

import numpy as np
import orbax.checkpoint as ocp
from etils import epath


class SnapshotFiles:
    """The checkpoint directory (a temporary one, owned, when none is given) and its files."""

    def __init__(self, directory: str | None, *, use_compression: bool = False):
        self.owned = directory is None
        self.directory = epath.Path(directory if directory is not None
                                    else tempfile.mkdtemp(prefix="tarragon_kv_"))
        self._saver = ocp.PyTreeCheckpointer(use_compression=use_compression)     # the writer's
        self._reader = ocp.PyTreeCheckpointer(use_compression=use_compression)    # restores'
        self._read_lock = threading.Lock()           # one Orbax restore at a time per store

    def first_seq(self) -> int:
        """The first free snapshot number: after checkpoints already in a reused directory
        (Orbax refuses to overwrite)."""
        if self.owned or not self.directory.exists():
            return 0
        seqs = [int(p.name.split(".")[0]) for p in self.directory.glob("aw*/*")
                if p.name.split(".")[0].isdigit()]
        return max(seqs, default=-1) + 1

    def path(self, aw: int, seq: int) -> epath.Path:
        return self.directory / f"aw{aw}" / f"{seq:08d}"

    def save(self, path: epath.Path, tree: dict[str, np.ndarray]) -> None:
        """tree: {"blocks": [n, L, parts, page_size, kv, hd]}."""
        self._saver.save(path, tree)

    def load(self, path: str) -> np.ndarray:
        """A checkpoint's "blocks" array, [n, L, parts, page_size, kv, hd] (FileNotFoundError once gone)."""
        args = ocp.args.PyTreeRestore(restore_args={"blocks": ocp.RestoreArgs(restore_type=np.ndarray)})
        with self._read_lock:
            return self._reader.restore(path, args=args)["blocks"]

    @staticmethod
    def exists(path: str) -> bool:
        return epath.Path(path).exists()

    @staticmethod
    def remove(path: str) -> None:
        epath.Path(path).rmtree(missing_ok=True)

    def close(self) -> None:
        """Delete the directory if this store made it."""
        if self.owned:
            self.directory.rmtree(missing_ok=True)
