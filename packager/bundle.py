"""Bundles for fleets: a folder + .tar.gz with a manifest of every file's sha256 and size.

``verify_integrity`` names the first file whose bytes changed; ``safe_extract`` refuses absolute
paths, ``..`` components, and links or devices, so a bundle can never write outside its folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tempfile
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


class BundleError(ValueError):
    """A bundle that is corrupted, tampered with or unsafe to unpack."""


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, versions: dict, extra: dict | None = None) -> dict:
    """Hash every file under ``folder`` (but the manifest) into manifest.json."""
    folder = Path(folder)
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            raise BundleError(f"{p} is a link: bundles hold plain files only")
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(folder).as_posix()] = {"sha256": sha256(p), "bytes": p.stat().st_size}
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
        "files": files,
        **(extra or {}),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{folder} is not a bundle: {MANIFEST} is missing") from None
    except json.JSONDecodeError as e:
        raise BundleError(f"{path} is corrupted: {e}") from None


def verify_integrity(folder: Path) -> dict:
    """Check every listed file's size and sha256; raise BundleError naming the first mismatch."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for rel, info in manifest["files"].items():
        p = folder / rel
        if not p.is_file():
            raise BundleError(f"bundle file {rel} is missing")
        if p.stat().st_size != info["bytes"] or sha256(p) != info["sha256"]:
            raise BundleError(f"bundle file {rel} has changed (sha256 mismatch): the bundle is corrupted or tampered with")
    extra = sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST and p.relative_to(folder).as_posix() not in manifest["files"]
    )  # fmt: skip
    if extra:
        raise BundleError(f"bundle holds files its manifest does not list: {', '.join(extra[:3])}")
    return manifest


def make_tarball(folder: Path, out: Path) -> Path:
    """Write ``folder`` as a .tar.gz (atomically), entries under the folder's name."""
    folder, out = Path(folder), Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(folder, arcname=folder.name)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _safe_member(m: tarfile.TarInfo) -> None:
    p = PurePosixPath(m.name)
    if p.is_absolute() or m.name.startswith(("/", "\\")):
        raise BundleError(f"refusing to unpack {m.name!r}: absolute path")
    if ".." in p.parts:
        raise BundleError(f"refusing to unpack {m.name!r}: '..' leads out of the bundle")
    if m.issym() or m.islnk():
        raise BundleError(f"refusing to unpack {m.name!r}: links are not allowed in a bundle")
    if not (m.isfile() or m.isdir()):
        raise BundleError(f"refusing to unpack {m.name!r}: not a plain file or folder")


def safe_extract(tarball: Path, dest: Path) -> Path:
    """Unpack a bundle tarball into ``dest`` after checking every member; returns the bundle folder."""
    dest = Path(dest)
    try:
        tar = tarfile.open(tarball, "r:gz")
    except (tarfile.TarError, OSError) as e:
        raise BundleError(f"{tarball} is not a readable .tar.gz bundle: {e}") from None
    with tar:
        members = tar.getmembers()
        for m in members:
            _safe_member(m)
        tops = {PurePosixPath(m.name).parts[0] for m in members}
        if len(tops) != 1:
            raise BundleError(f"{tarball} should hold one bundle folder, it holds {sorted(tops)[:3]}")
        dest.mkdir(parents=True, exist_ok=True)
        tar.extractall(dest, members=members, filter="data")
    return dest / tops.pop()
