"""Inductor's and Triton's on-disk caches, and FlashInfer's JIT builds, under `CompileConfig.cache_dir`, beside the
kernel cache, so that one directory holds what a warm start reads (`<cache_dir>/inductor`, `<cache_dir>/triton`,
`<cache_dir>/flashinfer`; FlashInfer's prebuilt kernels, a package of their own, are read where they are).

The libraries take their cache location from an environment variable, read by the whole process
(`TORCHINDUCTOR_CACHE_DIR`, `TRITON_CACHE_DIR`, `FLASHINFER_WORKSPACE_BASE`): the first Inductor compile of a process
sets them, and a later one asking for another `cache_dir` is an error rather than a cache silently split over two
places. A variable the user set before compiled_llm was imported is theirs and is left alone (the report says so),
as is FlashInfer's location where FlashInfer was imported before (it reads the variable once, at import).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_VARIABLES = {
    "TORCHINDUCTOR_CACHE_DIR": "inductor",
    "TRITON_CACHE_DIR": "triton",
    "FLASHINFER_WORKSPACE_BASE": "flashinfer",
}
_USERS = {name: os.environ[name] for name in _VARIABLES if os.environ.get(name)}  # set before we could set them
_chosen: Path | None = None  # the cache_dir of this process's first Inductor compile


def use_cache_dir(cache_dir: str | Path) -> str:
    """Point Inductor's and Triton's caches under `cache_dir` for this process (see the module docstring); returns
    the report's line. Raises ValueError if an earlier compile of this process chose another directory."""
    global _chosen
    cache_dir = Path(cache_dir).expanduser().resolve()
    if _chosen is None:
        if "flashinfer" in sys.modules and "FLASHINFER_WORKSPACE_BASE" not in _USERS:
            _USERS["FLASHINFER_WORKSPACE_BASE"] = "its own directory (imported before this compile)"
        for name, subdirectory in _VARIABLES.items():
            if name not in _USERS:
                os.environ[name] = str(cache_dir / subdirectory)
        _chosen = cache_dir
    elif cache_dir != _chosen:
        raise ValueError(
            f"cache_dir={str(cache_dir)!r}: this process already compiles with Inductor's and Triton's caches under "
            f"{str(_chosen)!r} (the cache_dir of its first compile), and their location is process-wide; use one "
            "cache_dir per process"
        )
    ours = ["kernel choices", *(sub for name, sub in _VARIABLES.items() if name not in _USERS)]
    line = f"{', '.join(ours[:-1])} and {ours[-1]}" if len(ours) > 1 else ours[0]
    line += f" under {cache_dir}"
    for name, sub in _VARIABLES.items():
        if name in _USERS:
            line += f"; {sub} in {_USERS[name]}" + (f" (${name})" if name in os.environ else "")
    return line
