"""Files: hashing, atomic writes, and checking a bundle's files against its manifest."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import platformdirs

from .errors import BundleError


def user_cache_root() -> Path:
    """The per-user cache folder of scan-deploy (text embeddings, runtime-built engines)."""
    return Path(platformdirs.user_cache_dir("scan-deploy"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    """The process umask, read without changing it (os.umask would race with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def new_file_mode() -> int:
    """The mode `open()` gives a new file: 0o666 less the process umask."""
    return 0o666 & ~_umask()


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)` and rename onto `path`: readers never see a partial file.

    The file gets the usual mode for a new file (mkstemp's temporary is 0600, which would hide
    a shared cache or bundle from other users).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_folder(built: Path, out: Path) -> None:
    """Move the finished folder `built` (a sibling of `out`) to `out`: readers never see `out` half-written.

    `built` (from mkdtemp, 0700) gets the mode a plain mkdir would give; an existing `out` is renamed
    aside, put back if the swap fails, and removed only after the new one is in place.
    """
    os.chmod(built, 0o777 & ~_umask())
    if not out.exists():
        os.replace(built, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, old)  # a directory may be renamed onto an empty one
    try:
        os.replace(built, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def verify_files(root: Path, records, hashes: bool = True) -> None:
    """Each recorded file exists with its size (and, with `hashes`, its sha256); one line otherwise."""
    for record in records:
        path = Path(root) / record.file
        if not path.is_file():
            raise BundleError(f"bundle {root} is missing {record.file}: copy the whole bundle folder, or re-export it")
        size = path.stat().st_size
        if size != record.bytes:
            raise BundleError(
                f"bundle file {record.file} has {size} bytes, the manifest says {record.bytes}: it was altered or "
                "truncated; copy the bundle again or re-export it"
            )
        if hashes and sha256_file(path) != record.sha256:
            raise BundleError(
                f"bundle file {record.file} does not match its sha256 in the manifest: it was altered; "
                "copy the bundle again or re-export it"
            )
