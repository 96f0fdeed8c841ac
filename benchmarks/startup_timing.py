"""How a command's output arrives: when its first byte comes, the longest silence before a line matching
--answer, and when that line comes. For the quickstart's "prints at once, never silent, first answer
sooner" (BENCHMARKS.md):

    python benchmarks/startup_timing.py --answer " -> " -- python examples/quickstart.py

Output is read as it is written (stdout and stderr together, so progress bars count); the command's own
output is kept in --log.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--answer", required=True, help="text of the first line that counts as an answer")
    parser.add_argument("--log", help="write the command's output here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    output, first_byte, answer_at, last, longest_gap = b"", None, None, start, (0.0, 0.0)
    answer = args.answer.encode()
    while chunk := os.read(process.stdout.fileno(), 65536):
        now = time.perf_counter()
        first_byte = first_byte if first_byte is not None else now - start
        if answer_at is None:
            if now - last > longest_gap[0]:
                longest_gap = (now - last, last - start)
            if answer in output + chunk:
                answer_at = now - start
        last = now
        output += chunk
    process.wait()
    total = time.perf_counter() - start
    if args.log:
        with open(args.log, "wb") as log:
            log.write(output)
    print(f"first output after {first_byte:.2f} s; longest silence before the first answer {longest_gap[0]:.2f} s "
          f"(from {longest_gap[1]:.1f} s); first answer after {answer_at if answer_at is None else round(answer_at, 1)} s; "
          f"done after {total:.1f} s, exit code {process.returncode}")  # fmt: skip
    tail = output.decode(errors="replace").replace("\r", "\n").strip().splitlines()[-4:]
    print("\n".join(tail))
    sys.exit(process.returncode)


if __name__ == "__main__":
    main()
