"""The other ranks of an `LLM(model, tensor_parallel_size=N)` made outside torch.distributed: this process becomes
rank 0 and starts ranks 1..N-1 as worker processes on this host, each building the same engine for its rank (one GPU
a rank: cuda:rank). Rank 0's engine is a MirroredEngine: before each step it sends the workers what changed since the
last one (requests queued and aborted) and its random state, and each worker applies them to its engine and steps
too, so every rank schedules and samples the same batch, as the collectives in their graphs need. Whatever drives
rank 0's engine (`generate`, `generate_async`, the server's engine core) is mirrored the same way.

    rank 0 (the user's process, or the engine core)      ranks 1..N-1 (spawned)
    LLM(...) -> RankWorkers.start            ------->    run_worker: init_process_group, LLM(...), "ready"
    engine.queue / abort (recorded)
    engine.step  -- [queued, aborted], random state -->  apply them; engine.step   # same batch, same all-reduces
    exit / llm.close()                       -- stop ->  destroy_process_group, exit

A worker exits when rank 0's process dies; a worker that fails or dies is reported by rank 0 (its error, its exit
code), whose collectives then fail after the group's timeout. Several hosts need one process a rank started by
torchrun, each calling LLM (README, "Several GPUs").
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import socket
import threading
import time
from multiprocessing.reduction import ForkingPickler

import torch

from compiled_llm.engine import Engine, Request

log = logging.getLogger("compiled_llm.llm")

# How long a rank waits for the others in a collective (and at start-up, for them to join) before failing.
COLLECTIVE_TIMEOUT_S = 600.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_rank(rank: int, world: int, port: int, timeout_s: float) -> None:
    """Join the ranks' default process group (NCCL with GPUs, gloo without) and take this rank's GPU."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if cuda:
        if torch.cuda.device_count() < world:
            raise ValueError(f"tensor/expert parallelism over {world} ranks needs {world} GPUs on this host (one a "
                             f"rank); it has {torch.cuda.device_count()}")  # fmt: skip
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=timeout_s))  # fmt: skip


def random_state() -> tuple[bytes, bytes | None]:
    """This process's random state for sampling (CPU, and the current GPU's), which the workers take: as bytes, since
    a pipe would send a tensor through a shared-memory segment of its own, one a step."""
    gpu = torch.cuda.get_rng_state().numpy().tobytes() if torch.cuda.is_available() else None
    return torch.get_rng_state().numpy().tobytes(), gpu


def _set_random_state(state: tuple[bytes, bytes | None]) -> None:
    cpu, gpu = (None if b is None else torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in state)
    torch.set_rng_state(cpu)
    if gpu is not None:
        torch.cuda.set_rng_state(gpu)


def run_worker(connection, rank: int, world: int, port: int, model: str, tokenizer, dtype, config_fields: dict,
               timeout_s: float) -> None:  # fmt: skip
    """A worker rank's entry point (spawned): build the LLM, then run what rank 0 sends until it says stop."""
    import signal

    import torch.distributed as dist

    from compiled_llm.engine_core.core import exit_with_parent
    from compiled_llm.llm import LLM

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 handles Ctrl-C, and stops the workers
    exit_with_parent()
    try:
        init_rank(rank, world, port, timeout_s)
        llm = LLM(model, tokenizer, dtype=dtype, **config_fields)
    except BaseException as error:
        connection.send(("failed", f"{type(error).__name__}: {error}"))
        if isinstance(error, ValueError):  # bad input: rank 0 reports it in one line, so no traceback from here too
            raise SystemExit(1) from None
        raise
    connection.send(("ready", None))
    requests = _RankZeroRequests()
    try:
        while True:
            try:
                message = connection.recv()
            except EOFError:  # rank 0 is gone
                break
            if message[0] == "stop":
                break
            _, changes, state = message
            try:
                with torch.no_grad():
                    requests.step_like_rank_0(llm.engine, changes, state)
            except Exception:  # rank 0 ran the same step: it fails in its collectives after their timeout
                log.exception("rank %d: a step failed; this rank stops", rank)
                raise
    finally:
        dist.destroy_process_group()


class _RankZeroRequests:
    """A worker's requests by rank 0's ids, and back."""

    def __init__(self):
        self.by_id: dict[str, Request] = {}
        self.ids: dict[Request, str] = {}

    def step_like_rank_0(self, engine: Engine, changes: list[tuple], state: tuple) -> None:
        """Apply rank 0's changes since its last step, then step with its random state."""
        for change in changes:
            if change[0] == "queue":
                _, request_id, prompt_token_ids, params, prompt = change
                request = engine.add_request(prompt_token_ids, params, prompt)
                self.by_id[request_id], self.ids[request] = request, request_id
            else:  # "abort"
                request = self.by_id.pop(change[1])
                del self.ids[request]
                engine.abort(request)
        _set_random_state(state)
        for request in engine.step():
            if request.finish_reason is not None and request in self.ids:
                del self.by_id[self.ids.pop(request)]


class MirroredEngine(Engine):
    """Rank 0's engine: each step is preceded by sending the workers the requests queued and aborted since the last
    one (by rank 0's request ids) and the random state the step samples with."""

    def __init__(self, *args, workers: RankWorkers):
        super().__init__(*args)
        self.workers = workers
        self._changes: list[tuple] = []
        self._mirrored: set[Request] = set()  # queued on the workers, not finished
        self.broken: str | None = None  # why a step failed on rank 0, after which none may run

    def queue(self, request: Request) -> None:
        super().queue(request)
        self._changes.append(("queue", request.request_id, request.prompt_token_ids, request.params, request.prompt))
        self._mirrored.add(request)

    def abort(self, request: Request) -> None:
        super().abort(request)
        if request in self._mirrored:
            self._mirrored.discard(request)
            self._changes.append(("abort", request.request_id))

    def step(self) -> list[Request]:
        if self.broken is not None:
            raise RuntimeError(f"the ranks are out of step since a step failed on rank 0 ({self.broken}); their "
                               "workers are stopped: build the LLM again")  # fmt: skip
        self.workers.send(self._changes)
        self._changes = []
        try:
            updated = super().step()
        except BaseException as error:  # the workers ran (or wait in) a step rank 0 left: they can never pair again
            self.broken = f"{type(error).__name__}: {error}"
            self.workers.close(wait_s=5)
            raise
        self._mirrored.difference_update(r for r in updated if r.finish_reason is not None)
        return updated


class RankWorkers:
    """Ranks 1..world-1, started by rank 0 (this process, which joins the group as rank 0 in `start`)."""

    def __init__(self, processes: list, connections: list, timeout_s: float):
        self.processes, self.connections, self.timeout_s = processes, connections, timeout_s
        self._stopped = threading.Event()
        threading.Thread(target=self._watch, name="compiled-llm-rank-watch", daemon=True).start()

    @classmethod
    def start(cls, model: str, tokenizer, dtype, config_fields: dict, world: int,
              timeout_s: float = COLLECTIVE_TIMEOUT_S) -> RankWorkers:  # fmt: skip
        context = multiprocessing.get_context("spawn")  # a fork would copy CUDA and the group's state
        port = _free_port()
        processes, connections = [], []
        for rank in range(1, world):
            ours, theirs = context.Pipe()
            process = context.Process(target=run_worker, name=f"compiled-llm-rank{rank}", args=(
                theirs, rank, world, port, model, tokenizer, dtype, config_fields, timeout_s))  # fmt: skip
            process.start()
            processes.append(process)
            connections.append(ours)
        log.info("started ranks 1-%d of %d for %s (pids %s)", world - 1, world, model,
                 ", ".join(str(p.pid) for p in processes))  # fmt: skip
        workers = cls(processes, connections, timeout_s)
        try:
            workers._meet(world, port)
        except BaseException:
            workers.close(wait_s=5)
            raise
        return workers

    def _meet(self, world: int, port: int) -> None:
        """Join the group as rank 0, failing as soon as a worker exits before the ranks meet (rather than after the
        group's timeout): the rendezvous waits in a thread while this one watches the workers."""
        failure: list[BaseException] = []

        def rendezvous() -> None:
            try:
                init_rank(0, world, port, self.timeout_s)
            except BaseException as error:  # noqa: BLE001  (raised in the caller's thread)
                failure.append(error)

        meeting = threading.Thread(target=rendezvous, name="compiled-llm-rendezvous", daemon=True)
        meeting.start()
        while meeting.is_alive():
            meeting.join(0.2)
            if (exited := self._first_exited()) is not None:
                rank, process = exited
                connection = self.connections[rank - 1]
                why = connection.recv()[1] if connection.poll() else (
                    "it stopped before running (a script that builds an LLM over several ranks needs "
                    "`if __name__ == \"__main__\":` around it: each rank imports the script again)")  # fmt: skip
                raise RuntimeError(f"rank {rank} (pid {process.pid}) exited with code {process.exitcode} before the "
                                   f"ranks met: {why}")  # fmt: skip
        if failure:
            raise failure[0]

    def wait_ready(self) -> None:
        """Raise RuntimeError (and stop the workers) if a worker failed to build its LLM."""
        for rank, connection in enumerate(self.connections, start=1):
            status, why = connection.recv() if connection.poll(self.timeout_s) else ("failed", "no answer")
            if status != "ready":
                self.close()
                raise RuntimeError(f"rank {rank} of {len(self.connections) + 1} could not build its LLM: {why}")

    def send(self, changes: list[tuple]) -> None:
        """Have every worker apply `changes` (MirroredEngine's) and step, with this process's random state."""
        if (exited := self._first_exited()) is not None:
            rank, process = exited
            raise RuntimeError(f"rank {rank} (pid {process.pid}) has exited with code {process.exitcode}: the ranks "
                               "can no longer step together; build the LLM again")  # fmt: skip
        message = ForkingPickler.dumps(("step", changes, random_state()))  # once for every worker
        for connection in self.connections:
            connection.send_bytes(message)

    def _first_exited(self) -> tuple[int, multiprocessing.Process] | None:
        """(rank, process) of the first worker that is no longer running, or None."""
        return next(((rank, p) for rank, p in enumerate(self.processes, start=1) if not p.is_alive()), None)

    def _watch(self) -> None:
        """Report a worker that dies while rank 0 may wait for it in a collective."""
        while not self._stopped.wait(1.0):
            if (exited := self._first_exited()) is not None:
                rank, process = exited
                log.error("rank %d (pid %d) exited with code %s: rank 0's collectives will fail after their timeout "
                          "(%.0f s)", rank, process.pid, process.exitcode, self.timeout_s)  # fmt: skip
                return

    def close(self, wait_s: float = 30.0) -> None:
        """Stop the workers (each leaves the group and exits; one that does not within `wait_s`, stuck in a
        collective, is terminated), then leave the group: a later LLM over several ranks starts its own."""
        import torch.distributed as dist

        if self._stopped.is_set():
            return
        self._stopped.set()
        for connection in self.connections:
            try:
                connection.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + wait_s
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join(5)
        if dist.is_initialized():
            dist.destroy_process_group()
