#!/usr/bin/env bash
# The GPU test set in parts that each fit one device call (the whole set takes well over 10 minutes):
#     PART=1 PARTS=4 bash benchmarks/gpu_tests.sh [pytest args...]
# Part k of n takes every n-th test file that has GPU tests (interleaved, so the long files spread over the parts);
# verbose output and the slowest tests go to $OUT/gpu_tests_part$PART.log, a summary to stdout.
set -uo pipefail
PART=${PART:-1}; PARTS=${PARTS:-4}; OUT=${OUT:-/tmp}
mapfile -t files < <(grep -l "mark.gpu" tests/test_*.py | sort)
mine=()
for i in "${!files[@]}"; do (( i % PARTS == PART - 1 )) && mine+=("${files[$i]}"); done
log="$OUT/gpu_tests_part$PART.log"
python3 -m pytest -v -m gpu -p no:cacheprovider --durations=20 "${mine[@]}" "$@" > "$log" 2>&1
rc=$?
grep -E "FAILED|ERROR" "$log" | cut -c1-200 | head -20
tail -1 "$log"
exit $rc
