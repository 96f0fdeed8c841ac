"""How many tokens per second the server's API process (HTTP, server-sent events) and the serving benchmark's
client can carry, with no GPU: the real app and EngineCoreClient over a fake engine core that gives each of up
to `--max-batch` running requests one token every `--step-ms`.

    python benchmarks/serving_http_capacity.py [--step-ms 1] [--port 8131] [--log-gc] [--gc-freeze]
    compiled-llm bench --mode serving --url http://127.0.0.1:8131 --concurrency 64 --num-requests 768 \\
        --input-len 128 --output-len 128

If the client measures far more than a GPU engine makes, the HTTP layer is not what limits serving. With a 6 ms
step the fake's own ceiling is a little under 64 / 6 ms (its steps take ~6.2-6.4 ms: the client's mean ITL).
`--log-gc` prints each full garbage collection of the API process: with torch imported, each one scans ~270k
objects and stalls the event loop, and every stream with it, for ~130 ms (every ~4 s at 64 x 6 ms streams on a
2-core machine). `--gc-freeze` moves what exists before serving out of the collector's reach (`gc.freeze()`),
which `serve()` does not do (yet): those pauses drop to ~5 ms.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import time

from compiled_llm.engine.limits import EngineStats, RequestLimits
from compiled_llm.engine_core.protocol import ABORT, ADD, READY, SHUTDOWN, STEP, EngineInfo


def fake_core(inbox, outbox, step_s: float, max_batch: int) -> None:
    """The engine core's protocol (engine_core/protocol.py) without an engine: token id 5 every step."""
    outbox.send((READY, EngineInfo(None, RequestLimits(100_000, 1 << 20, 16, 1 << 20, False), EngineStats())))
    waiting: list[list] = []  # [request id, max_tokens, tokens so far, first token's time]
    running: dict[int, list] = {}
    received = 0
    while True:
        while (not waiting and not running) or inbox.poll():
            for message in inbox.recv():
                if message[0] == ADD:
                    received += 1
                    waiting.append([message[1], message[3].max_tokens, 0, None])
                elif message[0] == ABORT:
                    running.pop(message[1], None)
                    waiting[:] = [w for w in waiting if w[0] != message[1]]
                elif message[0] == SHUTDOWN:
                    return
        while waiting and len(running) < max_batch:
            request = waiting.pop(0)
            running[request[0]] = request
        time.sleep(step_s)
        now, deltas = time.time(), []
        for request_id, request in list(running.items()):
            request[2] += 1
            request[3] = request[3] or now
            done = request[2] >= request[1]
            deltas.append((request_id, [5], 0, None, None, "length" if done else None, 0, request[3], now if done else None))
            if done:
                del running[request_id]
        outbox.send((STEP, deltas, EngineStats(len(running), len(waiting)), received))


def log_full_collections() -> None:
    started = [0.0]

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        elif info["generation"] == 2:
            print(f"gc: full collection, the event loop stopped {1e3 * (time.perf_counter() - started[0]):.1f} ms",
                  flush=True)  # fmt: skip

    gc.callbacks.append(callback)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step-ms", type=float, default=1.0)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--port", type=int, default=8131)
    parser.add_argument("--log-level", default="warning", help="uvicorn's; info also logs a line per request")
    parser.add_argument("--log-gc", action="store_true", help="print each full garbage collection's pause")
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() what exists before serving")
    args = parser.parse_args()
    if args.log_gc:
        log_full_collections()

    from compiled_llm.engine_core.client import EngineCoreClient
    from compiled_llm.server import serve

    context = multiprocessing.get_context("spawn")
    core_inbox, to_core = context.Pipe(duplex=False)
    from_core, core_outbox = context.Pipe(duplex=False)
    process = context.Process(target=fake_core, args=(core_inbox, core_outbox, args.step_ms / 1e3, args.max_batch))
    process.start()
    _, info = from_core.recv()
    client = EngineCoreClient(process, to_core, from_core, info)
    if args.gc_freeze:  # everything is imported and built: the modules, torch's included, live as long as the server
        gc.collect()
        gc.freeze()
    try:
        serve(client, "fake", port=args.port, log_level=args.log_level)
    finally:
        client.close()


if __name__ == "__main__":
    main()
