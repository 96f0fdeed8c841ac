"""`StageProgress`: one progress bar over the named stages of a long job (loading, compiling).

A stage such as an Inductor compile is one call that runs for a minute without reporting anything; a bar
that only moves between stages would look hung. Here a background thread redraws the bar every second,
so its elapsed time keeps moving and the stage's name says what is running.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from tqdm.auto import tqdm

REFRESH_S = 1.0


class StageProgress:
    """Example:
    >>> with StageProgress("compile_model", total=2) as progress:
    ...     with progress.stage("capturing the graph"):
    ...         ...
    ...     with progress.stage("compiling with Inductor"):
    ...         ...
    """

    def __init__(self, desc: str, total: int, disable: bool | None = False):
        self._bar = tqdm(total=total, desc=desc, unit="stage", leave=False, disable=disable,
                         bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}] {postfix}")  # fmt: skip
        self._stop = threading.Event()
        self._ticker = None
        if not self._bar.disable:
            self._ticker = threading.Thread(target=self._tick, name="compiled-llm-progress", daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(REFRESH_S):
            self._bar.refresh()

    @contextlib.contextmanager
    def stage(self, label: str) -> Iterator[None]:
        """Shows `label` while the block runs, then counts the stage as done."""
        self._bar.set_postfix_str(label)
        yield
        self._bar.update()

    def set_total(self, total: int) -> None:
        """When the job turns out to have fewer (or more) stages than first counted."""
        self._bar.total = total
        self._bar.refresh()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        self._bar.close()

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
