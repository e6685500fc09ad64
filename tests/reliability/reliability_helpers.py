"""Shared by the reliability tests: hashing published outputs, running the CLI, tmpfs mounts."""

from __future__ import annotations

import contextlib
import hashlib
import struct
import subprocess
import sys
from pathlib import Path

import pandas as pd

from glomscan.batch import STAGING

FAST = ["--tile", "256", "--overlap", "128", "--batch-size", "4"]


def staging_entries(out, slide):
    """(pid, entry) of the staging folders of ``slide``: <slide>.<pid of the analysing process>.<random>."""
    folder = out / STAGING
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        parts = p.name.rsplit(".", 2)
        if len(parts) == 3 and parts[0] == slide and parts[1].isdigit():
            found.append((int(parts[1]), p))
    return found


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder (relative path -> hash)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def published(out: Path, *names: str) -> dict[str, dict[str, str]]:
    return {n: tree_hashes(out / n) for n in names}


def summary(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "summary.csv").set_index("slide")


def assert_failures_have_reasons(out: Path) -> pd.DataFrame:
    s = summary(out)
    failed = s[s.status != "ok"]
    assert all(isinstance(r, str) and r.strip() for r in failed.reason), failed
    return s


def glomscan_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "glomscan.cli", *map(str, args)]


def huge_tiff(path: Path, side: int = 1_000_000) -> Path:
    """A 150-byte TIFF whose header claims side x side px (one deflate strip holding nothing)."""
    entries = [(256, 4, side), (257, 4, side), (258, 3, 8), (259, 3, 8), (262, 3, 1), (273, 4, 0),
               (277, 3, 1), (278, 4, side), (279, 4, 16)]
    data_offset = 8 + 2 + 12 * len(entries) + 4
    out = bytearray(b"II*\x00" + struct.pack("<IH", 8, len(entries)))
    for tag, typ, value in entries:
        value = data_offset if tag == 273 else value
        out += struct.pack("<HHI", tag, typ, 1) + (struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value))
    out += struct.pack("<I", 0) + b"\x78\x9c" + b"\x00" * 14
    path.write_bytes(bytes(out))
    return path


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """Mount a tmpfs of ``size`` at ``path``; yields False (nothing mounted) where mount is not
    allowed, so the caller falls back to a fake writer."""
    path.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                        capture_output=True).returncode == 0
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, capture_output=True)
