"""The per-call columns of a benchmarks/int4_linear_bench.py --json file, a line a linear and row count:
    python benchmarks/show_linear_rows.py out.json"""

import json
import sys
from pathlib import Path

for r in json.loads(Path(sys.argv[1]).read_text())["rows"]:
    columns = {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items() if k not in ("linear", "n", "k", "rows")}
    print(r["linear"], r["rows"], columns)
