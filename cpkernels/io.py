"""File helpers: every file a crash must not corrupt is written through `atomic_write`, and every
file we read back is checked against the sha256 digests recorded when it was written.

Adapters, heads, the trainer's checkpoint state, configs, results and figures all go through here.
safetensors checks a file's layout, not its bytes: one flipped bit in a tensor's data loads silently.
So adapter files record a digest per tensor (`tensor_digests`) and checkpoints one per file
(`file_digest`); `verify_digests` compares them on load, for both.
"""
from __future__ import annotations

import hashlib
import os
import uuid
import warnings
from pathlib import Path

import torch

__all__ = ["atomic_write", "DIGEST", "ChecksumError", "MissingChecksumWarning", "tensor_digest", "tensor_digests",
           "file_digest", "verify_digests"]

DIGEST = "sha256"


class ChecksumError(ValueError):
    """A file's bytes differ from the digest recorded when it was written: it is damaged."""


class MissingChecksumWarning(UserWarning):
    """A file written before cpkernels recorded digests: it loads, unverified."""


def atomic_write(path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, never a mix.

    Temp file in the same directory (os.replace is atomic only within one file system), fsync,
    os.replace, then fsync of the directory so that the rename itself survives a power cut.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    # Make the rename itself durable (POSIX; Windows cannot open directories).
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and raw bytes (row-major, as safetensors stores them).

    The same on every device and for any strides: the bytes are taken from a contiguous CPU copy.
    dtype and shape take part, so a header edit that reinterprets the same bytes is caught too.
    """
    h = hashlib.new(DIGEST)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    # reshape(-1) first: a 0-dim tensor cannot be viewed as bytes, a flat one can.
    h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tensor_digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """{name: tensor_digest} for a dict of tensors, in sorted name order."""
    return {name: tensor_digest(tensors[name]) for name in sorted(tensors)}


def file_digest(path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.new(DIGEST)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_digests(file, actual: dict[str, str], recorded: dict[str, str] | None, what: str = "tensor") -> None:
    """Compare the digests computed on load (`actual`) with those recorded when `file` was written.

    `recorded` None means the file predates digests: one MissingChecksumWarning, and it loads. Any
    difference raises a ChecksumError naming `file` and the `what` (tensor, file) concerned.
    """
    if recorded is None:
        warnings.warn(f"{file} carries no {DIGEST} checksums (written before cpkernels recorded them): loaded "
                      f"unverified; save it again to add them", MissingChecksumWarning, stacklevel=3)
        return
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        raise ChecksumError(f"{file}: the recorded {DIGEST} checksums are not a {{{what}: hex digest}} object; the "
                            f"file is damaged")
    for name in sorted(set(actual) | set(recorded)):
        if name not in recorded:
            raise ChecksumError(f"{file}: {what} {name!r} has no recorded {DIGEST} checksum: it was added after "
                                f"saving, or the file is damaged")
        if name not in actual:
            raise ChecksumError(f"{file}: {what} {name!r} has a recorded {DIGEST} checksum but is missing; the "
                                f"file is damaged")
        if actual[name] != recorded[name]:
            raise ChecksumError(f"{file}: {what} {name!r} does not match its {DIGEST} checksum (recorded "
                                f"{recorded[name][:12]}…, read {actual[name][:12]}…): the file is damaged (disk, "
                                f"copy or download); restore it or save it again")
