"""How many tokens per second the server's API process (HTTP, server-sent events) and the serving benchmark's
client can carry, with no GPU: the real app and EngineCoreClient over a fake engine core that gives each of up
to `--max-batch` running requests one token every `--step-ms`.

    python benchmarks/serving_http_capacity.py [--step-ms 1] [--port 8131]
    compiled-llm bench --mode serving --url http://127.0.0.1:8131 --concurrency 64 --num-requests 512 \\
        --input-len 128 --output-len 128

If the client measures far more than a GPU engine makes, the HTTP layer is not what limits serving.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step-ms", type=float, default=1.0)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--port", type=int, default=8131)
    parser.add_argument("--log-level", default="warning", help="uvicorn's; info also logs a line per request")
    args = parser.parse_args()

    from compiled_llm.engine_core.client import EngineCoreClient
    from compiled_llm.server import serve

    context = multiprocessing.get_context("spawn")
    core_inbox, to_core = context.Pipe(duplex=False)
    from_core, core_outbox = context.Pipe(duplex=False)
    process = context.Process(target=fake_core, args=(core_inbox, core_outbox, args.step_ms / 1e3, args.max_batch))
    process.start()
    _, info = from_core.recv()
    client = EngineCoreClient(process, to_core, from_core, info)
    try:
        serve(client, "fake", port=args.port, log_level=args.log_level)
    finally:
        client.close()


if __name__ == "__main__":
    main()
