"""Paths as URIs: local folders and object stores (s3://, gs://, abfs://) through one interface."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow.fs as pafs


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding ``uri`` and the path within it."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), uri
    if uri.startswith("file://"):
        return pafs.LocalFileSystem(), uri.removeprefix("file://")
    return pafs.FileSystem.from_uri(uri)


def list_files(uri: str, suffix: str) -> list[str]:
    """Files directly under ``uri`` ending in ``suffix``, as URIs of the same form; hidden files
    and ``_`` files (manifests, logs) are skipped, as Spark and Delta skip them."""
    filesystem, root = resolve(uri)
    scheme = uri.split("://", 1)[0] + "://" if "://" in uri and not uri.startswith("file://") else ""
    infos = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return sorted(
        f"{scheme}{info.path}"
        for info in infos
        if info.is_file and info.base_name.endswith(suffix) and not info.base_name.startswith(("_", "."))
    )


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a local file, read in 1 MiB blocks (checkpoints and snapshots record these)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
