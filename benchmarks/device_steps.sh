# Steps of one GPU device call (one command of at most 10 minutes), each with its own time limit, so that a slow step
# cannot take the rest's results with it:
#     BUDGET=580; source benchmarks/device_steps.sh; step NAME MAX_SECONDS "command"
# Each step gets min(MAX_SECONDS, the budget left) and shows the last $TAIL lines (default 25) of its output; a failed
# step's whole log is copied to $OUT (the device tool brings $OUT back).
: "${BUDGET:=570}" "${TAIL:=25}"
_devrun_start=$(date +%s)
mkdir -p /tmp/steps
step() {
    local name=$1 maxs=$2 cmd=$3
    local left=$(( BUDGET - ($(date +%s) - _devrun_start) ))
    local limit=$(( maxs < left ? maxs : left ))
    if (( limit < 10 )); then echo "=== $name: SKIPPED (budget)"; return 0; fi
    local t0=$(date +%s)
    timeout "$limit" bash -c "$cmd" > "/tmp/steps/$name.log" 2>&1
    local rc=$?
    echo "=== $name: rc=$rc $(( $(date +%s) - t0 ))s (limit $limit)"
    tail -n "$TAIL" "/tmp/steps/$name.log"
    if (( rc != 0 )) && [[ -n "${OUT:-}" ]]; then cp "/tmp/steps/$name.log" "$OUT/$name.log"; fi
    return 0
}
