"""Chunked, resumable score store.

Work is saved as it completes, one `.npz` per chunk, each written atomically (temporary file,
fsync, rename, fsync of the directory), so a killed run never leaves a half chunk that looks
done. A chunk holds scores of some candidates on some task columns; the final arrays are put
together from the chunks, so an interrupted run ends with exactly the outputs of an
uninterrupted one.
"""

from __future__ import annotations

import errno
import os
import pathlib
import zipfile

import numpy as np

from nuggets_jax.errors import UserError


class StoreError(UserError, RuntimeError):
    """The store cannot be written or read (disk full, not writable, corrupt chunk)."""


def atomic_write_bytes(path: pathlib.Path, data: bytes) -> None:
    """Writes `data` to `path` so that readers see either the old file or the whole new one."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise StoreError(f"{path}: the disk is full ({e.strerror}).") from None
        if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise StoreError(f"{path}: cannot write here ({e.strerror}); choose a writable --workdir.") from None
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An uncompressed `.npz` in memory, byte-identical for identical arrays (fixed zip times)."""
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, value in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            arr_buf = io.BytesIO()
            np.lib.format.write_array(arr_buf, np.asarray(value), allow_pickle=False)
            z.writestr(info, arr_buf.getvalue())
    return buf.getvalue()


def write_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    atomic_write_bytes(path, npz_bytes(arrays))


class ScoreStore:
    """Chunk files under `workdir/chunks/`, one subfolder per process."""

    def __init__(self, workdir: str | pathlib.Path, process_index: int = 0):
        self.root = pathlib.Path(workdir) / "chunks"
        self.dir = self.root / f"process_{process_index:03d}"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(
                f"{self.dir}: cannot create the store ({e.strerror}); choose a writable --workdir."
            ) from None

    def path(self, name: str, process_index: int | None = None) -> pathlib.Path:
        """The chunk file of `name`, in this process's folder or in that of `process_index`."""
        folder = self.dir if process_index is None else self.root / f"process_{process_index:03d}"
        return folder / f"{name}.npz"

    def has(self, name: str) -> bool:
        return self.path(name).is_file()

    def write(self, name: str, **arrays: np.ndarray) -> None:
        write_npz(self.path(name), arrays)

    def read(self, name: str, process_index: int | None = None) -> dict[str, np.ndarray]:
        path = self.path(name, process_index)
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise StoreError(f"{path}: unreadable chunk ({e}); delete it and rerun to recompute it.") from None

    def names(self, prefix: str = "") -> list[str]:
        """This process's chunk names starting with `prefix`, sorted."""
        return sorted(p.stem for p in self.dir.glob(f"{prefix}*.npz"))

    def every_process_names(self, prefix: str = "") -> list[tuple[int, str]]:
        """(process index, name) of every process's chunks starting with `prefix`, by process then name."""
        paths = sorted(self.root.glob(f"process_*/{prefix}*.npz"))
        return [(int(p.parent.name.split("_")[1]), p.stem) for p in paths]

    def load(self, num_candidates: int, num_tasks: int, every_process: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The stored candidate scores put together: one_logp [N, T] (NaN = not stored), one_correct [N, T].

        Reads this process's chunks, or with `every_process` those of every process. Exact chunks
        hold whole rows; an adaptive round's chunk adds its task "columns". The "zero" chunk (the
        zero-shot pass) and the "baselines-" chunks (the baseline pass) hold no candidate rows.
        """
        logp = np.full((num_candidates, num_tasks), np.nan, np.float32)
        correct = np.zeros((num_candidates, num_tasks), np.int32)
        chunks = self.every_process_names() if every_process else [(None, name) for name in self.names()]
        for process_index, name in chunks:
            if name == "zero" or name.startswith("baselines-"):
                continue
            chunk = self.read(name, process_index)
            cols = chunk["columns"] if "columns" in chunk else np.arange(num_tasks)
            logp[np.ix_(chunk["candidates"], cols)] = chunk["one_logp"]
            correct[np.ix_(chunk["candidates"], cols)] = chunk["one_correct"]
        return logp, correct

    def clear(self) -> None:
        """Removes every chunk of every process (a fresh run)."""
        for path in self.root.glob("process_*/*.npz"):
            path.unlink()
