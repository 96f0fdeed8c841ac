#!/usr/bin/env bash
# The serving figures of BENCHMARKS.md in one run: start `compiled-llm serve` on MODEL (an API process and an
# engine-core process), drive it with `bench --mode serving` at each concurrency, stop it with SIGTERM, then the
# offline throughput of the same configuration (`bench --mode throughput`, 1000 requests at once).
#   benchmarks/serving_run.sh MODEL OUT_DIR [extra config flags...]
# CONCURRENCY (default 1,16,64,256) and REQUESTS (requests per level, default 32,256,1024,1024) pair up;
# VOCAB bounds the random prompt ids (default 1000); OFFLINE_REQUESTS (default 1000).
# IN_PROCESS=1 also serves the same model with the engine in the API process (`serve(LLM(...))`, the layout
# before the engine core) at concurrency 64, for comparison.
set -euo pipefail
model=$1 out=$2
shift 2
mkdir -p "$out"
IFS=, read -ra levels <<< "${CONCURRENCY:-1,16,64,256}"
IFS=, read -ra counts <<< "${REQUESTS:-32,256,1024,1024}"
port=8123

wait_ready() {
    python3 - "$1" <<'PY'
import sys, time, urllib.request
deadline = time.time() + 400
while True:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=2); break
    except OSError:
        if time.time() > deadline: raise SystemExit("server did not start")
        time.sleep(1)
PY
}

drive() {  # port, name
    for i in "${!levels[@]}"; do
        python3 -m compiled_llm.cli bench --mode serving --url "http://127.0.0.1:$1" --concurrency "${levels[$i]}" \
            --num-requests "${counts[$i]}" --input-len 128 --output-len 128 --vocab-size "${VOCAB:-1000}" --json "$out/$2_c${levels[$i]}.json"
    done
}

python3 -m compiled_llm.cli serve "$model" --port $port "$@" > "$out/server.log" 2>&1 &
server=$!
wait_ready $port
drive $port serving
kill -TERM $server
wait $server && echo "server exited with 0"

if [[ "${IN_PROCESS:-0}" == 1 ]]; then
    levels=(64) counts=(1024)
    python3 - "$model" $((port + 1)) "$@" > "$out/server_in_process.log" 2>&1 <<'PY' &
import sys
from compiled_llm.cli_config import add_config_flags, config_from_args
import argparse, logging
logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
parser = argparse.ArgumentParser()
add_config_flags(parser)
config = config_from_args(parser.parse_args(sys.argv[3:]))
from compiled_llm import LLM
from compiled_llm.server import serve
sys.exit(serve(LLM(sys.argv[1], **config.model_dump()), sys.argv[1], port=int(sys.argv[2])))
PY
    server=$!
    wait_ready $((port + 1))
    drive $((port + 1)) in_process
    kill -TERM $server
    wait $server && echo "in-process server exited with 0"
fi

# The server's limits (CompileConfig's defaults unless "$@" sets them), not bench's throughput limits: the same engine.
python3 -m compiled_llm.cli bench "$model" --mode throughput --num-requests "${OFFLINE_REQUESTS:-1000}" --input-len 128 --output-len 128 \
    --baselines none --json "$out/throughput.json" --max-batch-size 64 --max-num-tokens 8192 "$@"
