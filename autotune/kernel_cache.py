"""`KernelCache`: the tuned kernel choices of one machine kind, on disk, as human-readable JSON.

    <cache_dir>/kernels/<device key>/<op>/<entry key>.json

- device key: GPU name and compute capability (or the CPU's architecture) and the torch, triton and flashinfer
  versions: a choice timed under other software or hardware is never read;
- entry key: a hash of (op, dtype, shape bucket); the entry also records each candidate's source hash, and a
  lookup whose candidates' sources differ from the recorded ones misses (a changed kernel is never served a stale
  choice);
- one file per entry, written to a temporary file in the same directory and renamed over the old one
  (`os.replace` is atomic), so a reader sees the old entry or the new one, and two writers, in threads or
  processes, never mix their bytes (the last rename wins, and both entries were valid);
- an entry that does not parse, or whose contents are not the key it is filed under (hand-edited, copied from
  elsewhere), is ignored with a warning and counts as a miss: a cache can only cost a re-tune, never a crash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

log = logging.getLogger("compiled_llm.autotune")

FORMAT = 1  # of an entry file; another value is a miss


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "none"


def device_key(device: torch.device | str) -> str:
    """What a timing depends on besides the kernel: the device kind and the software that builds its kernels,
    as a directory name ("NVIDIA-H200-sm90-torch2.11.0-triton3.6.0-flashinfer0.7.2")."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        hardware = f"{torch.cuda.get_device_name(device)}-sm{major}{minor}"
    else:
        hardware = f"{device.type}-{platform.machine()}"
    versions = (f"torch{torch.__version__}", f"triton{_version('triton')}", f"flashinfer{_version('flashinfer-python')}")
    return re.sub(r"[^A-Za-z0-9.+_-]+", "-", "-".join((hardware, *versions)))


def source_hash(*sources: object) -> str:
    """A short hash of the source of kernels, functions or strings (a Triton JITFunction by its `src`)."""
    import inspect

    digest = hashlib.sha256()
    for source in sources:
        text = source if isinstance(source, str) else getattr(source, "src", None) or inspect.getsource(source)
        digest.update(text.encode())
    return digest.hexdigest()[:16]


@dataclass
class CacheEntry:
    """One tuned choice: for `op` on `dtype` inputs in `bucket`, `winner` (a candidate name, with its `config`)
    beat the others; `times_us` per candidate measured, `candidates` their source hashes when timed."""

    op: str
    dtype: str
    bucket: dict
    candidates: dict[str, str]
    winner: str
    config: dict = field(default_factory=dict)
    times_us: dict[str, float] = field(default_factory=dict)
    tuned_at: str = ""
    format: int = FORMAT

    def key(self) -> str:
        return entry_key(self.op, self.dtype, self.bucket)


def format_bucket(bucket: dict) -> str:
    """{"n": 64, "k": 128} -> "n=64 k=128" (the report, `tune` and `cache ls`)."""
    return " ".join(f"{key}={value}" for key, value in bucket.items())


def _as_json(bucket: dict) -> dict:
    """The bucket as it reads back from JSON (tuples become lists, keys strings), so that a stored entry compares
    equal to the key it was stored under."""
    return json.loads(json.dumps(bucket, sort_keys=True))


def entry_key(op: str, dtype: str, bucket: dict) -> str:
    text = json.dumps({"op": op, "dtype": dtype, "bucket": bucket}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _op_directory_name(op: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", op)


class KernelCache:
    """Tuned choices under `cache_dir` for one device key (see the module docstring)."""

    def __init__(self, cache_dir: str | Path, device: torch.device | str = "cpu", key: str | None = None):
        self.root = Path(cache_dir).expanduser() / "kernels" / (key or device_key(device))

    def _path(self, op: str, dtype: str, bucket: dict) -> Path:
        return self.root / _op_directory_name(op) / f"{entry_key(op, dtype, bucket)}.json"

    def get(self, op: str, dtype: str, bucket: dict, candidates: dict[str, str]) -> CacheEntry | None:
        """The stored choice for (op, dtype, bucket) if its candidates' sources are `candidates` (name -> source
        hash) and its winner is one of them; else None."""
        bucket = _as_json(bucket)
        path = self._path(op, dtype, bucket)
        try:
            if not path.exists():
                return None
        except OSError as error:  # a directory we may not search: a miss, as the module promises, not a crash
            log.warning("kernel cache: %s cannot be read (%s); ignored", path, error)
            return None
        entry = self._read(path)
        if entry is None:
            return None
        if (entry.op, entry.dtype, entry.bucket) != (op, dtype, bucket):
            log.warning("kernel cache: %s holds an entry for %s %s %s, not the key it is filed under; ignored",
                        path, entry.op, entry.dtype, entry.bucket)  # fmt: skip
            return None
        if entry.candidates != candidates or entry.winner not in candidates:
            log.info("kernel cache: %s %s %s was tuned over other candidate sources; stale, ignored", op, dtype, bucket)
            return None
        return entry

    def _read(self, path: Path) -> CacheEntry | None:
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                log.warning("kernel cache: %s has format %r, not %d; ignored", path, data.get("format"), FORMAT)
                return None
            return CacheEntry(**data)
        except (OSError, ValueError, TypeError, AttributeError) as error:
            log.warning("kernel cache: %s cannot be read (%s); ignored", path, error)
            return None

    def put(self, entry: CacheEntry) -> Path:
        """Store `entry` atomically (a temporary file renamed over the old entry); returns its path."""
        if not entry.tuned_at:
            entry.tuned_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        entry.bucket = _as_json(entry.bucket)
        path = self._path(entry.op, entry.dtype, entry.bucket)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        try:
            os.chmod(temporary, 0o644)  # mkstemp's 0600 would keep a shared cache directory from other users
            with os.fdopen(handle, "w") as f:
                json.dump(asdict(entry), f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return path

    def entries(self) -> list[CacheEntry]:
        """Every readable entry, by op then file name (unreadable ones are warned about and left out)."""
        if not self.root.exists():
            return []
        found = (self._read(path) for path in sorted(self.root.glob("*/*.json")))
        return [entry for entry in found if entry is not None]

    def clear(self) -> int:
        """Remove every entry of this device key (not a concurrent writer's temporary file, which its rename
        still needs); returns how many went."""
        removed = 0
        if self.root.exists():
            for path in self.root.glob("*/*.json"):
                path.unlink(missing_ok=True)
                removed += 1
        return removed
