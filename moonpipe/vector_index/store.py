"""Index versions on disk or object storage, published atomically.

    <index_uri>/CURRENT                         {"index_version": ..., "model_version": ...}
    <index_uri>/<version>/index.faiss           the FAISS index
    <index_uri>/<version>/id_map.parquet        faiss_id -> product_id (+ generated attributes)
    <index_uri>/<version>/manifest.json         what was indexed, how, how well; sha256 of each file

A build writes into ``<version>.partial/``, reads every file back and checks it (checksums, the
index loads, its size matches the id map), renames the folder, and only then rewrites CURRENT (a
rename on local disks; one PUT, atomic per object, on object stores). A crash at any point before
leaves the previous version serving; leftover ``.partial`` folders are swept by later builds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from moonpipe import storage

LOG = logging.getLogger("moonpipe.vector_index.store")
CURRENT = "CURRENT"
INDEX_FILE = "index.faiss"
ID_MAP_FILE = "id_map.parquet"
MANIFEST_FILE = "manifest.json"
PARTIAL = ".partial"
FORMAT = 1


class IndexCorrupt(RuntimeError):
    """An index version's files do not match its manifest."""


class NoIndex(FileNotFoundError):
    """No published index version where one was asked for."""


def new_version_name(model_version: str, now: datetime | None = None) -> str:
    """Sortable by build time: ``20261101T020304.123456Z-<model>-<random>``."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%S.%fZ")
    return f"{stamp}-{model_version[:16]}-{uuid.uuid4().hex[:6]}"


@dataclass
class LoadedIndex:
    """A verified index version, ready to search."""

    index: faiss.Index
    id_map: pa.Table
    manifest: dict[str, Any]
    uri: str

    @property
    def version(self) -> str:
        return self.manifest["index_version"]

    @property
    def params(self) -> dict[str, int]:
        return self.manifest["index_params"]


class IndexStore:
    """The versions under ``root_uri`` (``Settings.index_uri``)."""

    def __init__(self, root_uri: str) -> None:
        self.root_uri = root_uri.rstrip("/")
        self.fs, self.root = storage.resolve(self.root_uri)
        self._local = isinstance(self.fs, pafs.LocalFileSystem)

    # -- files ------------------------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _write_bytes(self, path: str, data: bytes) -> None:
        with self.fs.open_output_stream(path) as out:
            out.write(data)

    def _read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as handle:
            return handle.read()

    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def _sha256(self, path: str) -> tuple[str, int]:
        digest, size = hashlib.sha256(), 0
        with self.fs.open_input_stream(path) as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
                size += len(block)
        return digest.hexdigest(), size

    def version_uri(self, version: str) -> str:
        return f"{self.root_uri}/{version}"

    # -- publish ----------------------------------------------------------------------------

    def write_version(self, version: str, index: faiss.Index, id_map: pa.Table, manifest: dict[str, Any]) -> str:
        """Write and verify ``version`` in its ``.partial`` folder, then rename it into place.
        Returns the version's URI. CURRENT is not touched (see ``set_current``)."""
        if index.ntotal != id_map.num_rows:
            raise ValueError(f"index holds {index.ntotal} vectors but the id map {id_map.num_rows} rows")
        partial = self._path(version + PARTIAL)
        final = self._path(version)
        if self._exists(final):
            raise FileExistsError(f"index version {version} already exists at {self.version_uri(version)}")
        self.fs.create_dir(partial, recursive=True)
        try:
            if self._local:
                faiss.write_index(index, f"{partial}/{INDEX_FILE}")
            else:
                self._write_bytes(f"{partial}/{INDEX_FILE}", faiss.serialize_index(index).tobytes())
            pq.write_table(id_map, f"{partial}/{ID_MAP_FILE}", filesystem=self.fs, compression="zstd")
            files = {}
            for name in (INDEX_FILE, ID_MAP_FILE):
                sha, size = self._sha256(f"{partial}/{name}")
                files[name] = {"sha256": sha, "bytes": size}
            full = {**manifest, "format": FORMAT, "index_version": version, "files": files,
                    "faiss_version": faiss.__version__}
            self._write_bytes(f"{partial}/{MANIFEST_FILE}", json.dumps(full, indent=2, default=str).encode())
            self._verify_folder(partial, full)  # read everything back before anyone can use it
            self.fs.move(partial, final)
        except BaseException:
            self.fs.delete_dir_contents(partial, missing_dir_ok=True)
            if self._exists(partial):
                self.fs.delete_dir(partial)
            raise
        return self.version_uri(version)

    def set_current(self, version: str, *, verify: bool = True) -> None:
        """Point CURRENT at ``version`` (verified first unless ``verify=False``), atomically."""
        manifest = self.manifest(version)
        if verify:
            self._verify_folder(self._path(version), manifest)
        payload = json.dumps({"index_version": version, "model_version": manifest.get("model_version"),
                              "switched_at": datetime.now(timezone.utc).isoformat()}).encode()
        if self._local:
            temp = self._path(f".{CURRENT}.{uuid.uuid4().hex}")
            self._write_bytes(temp, payload)
            self.fs.move(temp, self._path(CURRENT))  # rename(2): readers see the old or the new file
        else:
            self._write_bytes(self._path(CURRENT), payload)  # one PUT: atomic per object
        LOG.info("index: CURRENT -> %s", version)

    def current(self) -> str | None:
        path = self._path(CURRENT)
        if not self._exists(path):
            return None
        return json.loads(self._read_bytes(path))["index_version"]

    # -- read and verify ----------------------------------------------------------------------

    def versions(self) -> list[str]:
        """Complete version folders, oldest first (``.partial`` ones excluded)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        names = [i.base_name for i in infos if i.type == pafs.FileType.Directory]
        return sorted(n for n in names if not n.endswith(PARTIAL) and not n.startswith("."))

    def manifest(self, version: str) -> dict[str, Any]:
        path = self._path(version, MANIFEST_FILE)
        if not self._exists(path):
            raise NoIndex(f"no index version {version!r} under {self.root_uri} (have: {self.versions() or 'none'})")
        return json.loads(self._read_bytes(path))

    def _verify_folder(self, folder: str, manifest: dict[str, Any]) -> None:
        for name, expected in manifest["files"].items():
            path = f"{folder}/{name}"
            if not self._exists(path):
                raise IndexCorrupt(f"{path}: missing (manifest lists it). {self._fix(manifest)}")
            sha, size = self._sha256(path)
            if (sha, size) != (expected["sha256"], expected["bytes"]):
                raise IndexCorrupt(
                    f"{path}: sha256 {sha[:12]}… ({size} bytes) does not match the manifest's "
                    f"{expected['sha256'][:12]}… ({expected['bytes']} bytes): the file is corrupt. {self._fix(manifest)}"
                )

    def _fix(self, manifest: dict[str, Any]) -> str:
        return ("Rebuild with `moonpipe index build`, or switch to an earlier version with "
                f"`moonpipe index use VERSION` (versions: {', '.join(self.versions()[-5:])}).")

    def load(self, version: str | None = None, *, verify: bool = True, mmap: bool = False) -> LoadedIndex:
        """Load ``version`` (default: CURRENT), checking every file against the manifest."""
        version = version or self.current()
        if version is None:
            raise NoIndex(f"no index published under {self.root_uri}: run `moonpipe index build` first")
        manifest = self.manifest(version)
        folder = self._path(version)
        if verify:
            self._verify_folder(folder, manifest)
        try:
            if self._local:
                flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
                index = faiss.read_index(f"{folder}/{INDEX_FILE}", flags)
            else:
                index = faiss.deserialize_index(np.frombuffer(self._read_bytes(f"{folder}/{INDEX_FILE}"), np.uint8))
            id_map = pq.read_table(f"{folder}/{ID_MAP_FILE}", filesystem=self.fs)
        except RuntimeError as error:
            raise IndexCorrupt(f"{folder}: the index does not load ({error}). {self._fix(manifest)}") from None
        if index.ntotal != manifest["vector_count"] or id_map.num_rows != index.ntotal or index.d != manifest["dimension"]:
            raise IndexCorrupt(
                f"{folder}: index holds {index.ntotal} vectors of dimension {index.d}, id map {id_map.num_rows} rows, "
                f"manifest {manifest['vector_count']} x {manifest['dimension']}. {self._fix(manifest)}"
            )
        return LoadedIndex(index, id_map, manifest, self.version_uri(version))

    # -- retention ----------------------------------------------------------------------------

    def apply_retention(self, keep: int, *, protect: tuple[str, ...] = ()) -> list[str]:
        """Delete all but the newest ``keep`` versions (never CURRENT or ``protect``), and
        ``.partial`` leftovers of crashed builds older than a day. Returns the versions removed."""
        if keep < 1:
            raise ValueError(f"retention must keep at least 1 version, got {keep}")
        current = self.current()
        versions = self.versions()
        removed = [v for v in versions[:-keep] if v != current and v not in protect]
        for version in removed:
            self.fs.delete_dir(self._path(version))
        cutoff = datetime.now(timezone.utc).timestamp() - 86400
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        for info in infos:
            if info.base_name.endswith(PARTIAL) and info.mtime and info.mtime.timestamp() < cutoff:
                self.fs.delete_dir(info.path)
        if removed:
            LOG.info("index: retention %d removed %s", keep, removed)
        return removed

