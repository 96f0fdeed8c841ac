"""Which IPC carries the engine core's messages (compiled_llm/engine_core/): the standard library's candidates,
timed with the messages a step really sends.

    python benchmarks/engine_ipc.py [--steps 2000] [--json OUT]

A step message is (STEP, [RequestDelta] * batch, EngineStats, count): per request one new token, a few
characters of text, times. For each candidate and batch: the cost per step message seen from both ends
(sender: encode + write; receiver: read + decode; one-way, as many as the pipe takes, so the receiver's
time is the throughput), and the round-trip latency of one small message (what an add costs before the core
can schedule it). Candidates: multiprocessing.Pipe with pickle (Connection.send; the deltas as plain tuples, or
as named tuples), the same pipe with marshal (send_bytes; builtin types only, so SamplingParams could not
travel), multiprocessing.Queue (pickle, a feeder thread). No ZeroMQ or
msgpack: neither is a dependency, and the figures below are far under a step's milliseconds anyway.
"""

from __future__ import annotations

import argparse
import json
import marshal
import multiprocessing
import statistics
import time
from typing import NamedTuple

from compiled_llm.engine.limits import EngineStats
from compiled_llm.engine_core.protocol import STEP


class NamedDelta(NamedTuple):  # the deltas as named tuples: the first design, kept here as the slower candidate
    request_id: int
    new_token_ids: list[int]
    text_start: int
    new_text: str | None
    new_logprobs: list | None
    finish_reason: str | None
    num_cached_tokens: int
    first_token_time: float | None
    finish_time: float | None


def step_message(batch: int, step: int, delta=tuple):
    """What protocol.py sends: plain tuples per request, the stats as a named tuple."""
    deltas = [delta((i, [1000 + step], 100 + 4 * step, " tok", None, None, 0, 1.7e9, None)) for i in range(batch)]
    return (STEP, deltas, EngineStats(batch, 0, 4096, 1200, 0, 0, 0), step)


def build(kind: str, batch: int, step: int):
    if kind == "pipe-pickle-named":
        return step_message(batch, step, lambda t: NamedDelta(*t))
    message = step_message(batch, step)
    if kind == "pipe-marshal":  # builtin types only
        return (message[0], message[1], tuple(message[2]), message[3])
    return message


CANDIDATES = ("pipe-pickle", "pipe-pickle-named", "pipe-marshal", "queue-pickle")


def _sender(kind: str, conn, batch: int, steps: int, ready) -> None:
    messages = [build(kind, batch, s) for s in range(steps)]
    ready.wait()
    start = time.perf_counter()
    for m in messages:
        if kind.startswith("pipe-pickle"):
            conn.send(m)
        elif kind == "pipe-marshal":
            conn.send_bytes(marshal.dumps(m))
        else:
            conn.put(m)
    if kind == "queue-pickle":
        conn.close()
        conn.join_thread()
    return time.perf_counter() - start


def _sender_main(kind, conn, batch, steps, ready, result) -> None:
    result.put(_sender(kind, conn, batch, steps, ready))


def one_way(context, kind: str, batch: int, steps: int) -> dict:
    if kind == "queue-pickle":
        channel = context.Queue()
        reader, writer = channel, channel
    else:
        reader, writer = context.Pipe(duplex=False)
    ready, result = context.Event(), context.Queue()
    process = context.Process(target=_sender_main, args=(kind, writer, batch, steps, ready, result))
    process.start()
    time.sleep(0.5)  # the sender has built its messages
    ready.set()
    start = None
    for _ in range(steps):
        if kind.startswith("pipe-pickle"):
            message = reader.recv()
        elif kind == "pipe-marshal":
            message = marshal.loads(reader.recv_bytes())
        else:
            message = reader.get()
        start = start or time.perf_counter()  # from the first message: the sender's start-up is not counted
        assert message[0] == STEP
    received = time.perf_counter() - start
    sent = result.get()
    process.join()
    return {"sender_us_per_step": 1e6 * sent / steps, "receiver_us_per_step": 1e6 * received / (steps - 1)}


def _echo(kind, inbox, outbox, rounds) -> None:
    for _ in range(rounds):
        if kind == "queue-pickle":
            outbox.put(inbox.get())
        elif kind == "pipe-marshal":
            outbox.send_bytes(inbox.recv_bytes())
        else:
            outbox.send(inbox.recv())


def round_trip(context, kind: str, rounds: int) -> float:
    """Median round trip (µs) of an add-sized message."""
    if kind == "queue-pickle":
        there, back = context.Queue(), context.Queue()
        ends = (there, back, there, back)
    else:
        a_read, a_write = context.Pipe(duplex=False)
        b_read, b_write = context.Pipe(duplex=False)
        ends = (a_read, b_write, a_write, b_read)
    process = context.Process(target=_echo, args=(kind, ends[0], ends[1], rounds))
    process.start()
    out, inp = ends[2], ends[3]
    message = [("add", 7, list(range(128)), None, None)]
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        if kind == "queue-pickle":
            out.put(message)
            inp.get()
        elif kind == "pipe-marshal":
            out.send_bytes(marshal.dumps(message))
            marshal.loads(inp.recv_bytes())
        else:
            out.send(message)
            inp.recv()
        times.append(time.perf_counter() - start)
    process.join()
    return 1e6 * statistics.median(times[rounds // 10 :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--json")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    results = {}
    print(f"{'candidate':<18}{'batch':>6}{'send µs/step':>14}{'receive µs/step':>17}{'round trip µs':>15}")
    for kind in CANDIDATES:
        rtt = round_trip(context, kind, 2000)
        for batch in (int(b) for b in args.batches.split(",")):
            r = one_way(context, kind, batch, args.steps)
            results[f"{kind}/{batch}"] = {**r, "round_trip_us": rtt}
            print(f"{kind:<18}{batch:>6}{r['sender_us_per_step']:>14.1f}{r['receiver_us_per_step']:>17.1f}{rtt:>15.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
