#!/usr/bin/env bash
# The serving figures of BENCHMARKS.md in one run: start `compiled-llm serve` on MODEL, drive it with
# `bench --mode serving` at several concurrencies, stop it with SIGTERM, then the offline throughput of the
# same configuration. Usage: benchmarks/serving_run.sh MODEL OUT_DIR [extra config flags...]
set -euo pipefail
model=$1 out=$2
shift 2
port=8123
python3 -m compiled_llm.cli serve "$model" --port $port "$@" > "$out/server.log" 2>&1 &
server=$!
python3 - <<PY
import time, urllib.request
deadline = time.time() + 400
while True:
    try:
        urllib.request.urlopen("http://127.0.0.1:$port/health", timeout=2); break
    except OSError:
        if time.time() > deadline: raise SystemExit("server did not start")
        time.sleep(1)
PY
python3 -m compiled_llm.cli bench --mode serving --url http://127.0.0.1:$port --concurrency 1,16,64 \
    --num-requests "${NUM_REQUESTS:-64}" --input-len 128 --output-len 128 --json "$out/serving.json" --plot "$out/serving.png"
kill -TERM $server
wait $server && echo "server exited with 0"
python3 -m compiled_llm.cli bench "$model" --mode throughput --num-requests 1000 --input-len 128 --output-len 128 \
    --baselines none --json "$out/throughput.json" "$@"
