"""How long the request chain waited for a CPU, and behind what, from ``perf sched timehist``.

    .venv/bin/python bench/sched_waits.py TIMEHIST_TEXT

The chain is wrk, nginx and the llm-proxy server (their main threads): each time one of them was
woken, the time until it ran. Prints how many waits, how many over 0.3 ms, their total, and how much
of the waiting was spent behind an events process (``python``) on the same CPU. Used by
``bench/tail_ab.sh`` with PERF=1.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict

LINE = re.compile(r"^\s*([\d.]+)\s+\[(\d+)\]\s+(.+?)\s+[\d.]+\s+([\d.]+)\s+([\d.]+)\s*$")
CHAIN = re.compile(r"^(wrk|nginx|llm-proxy)\[\d+(/\d+)?\]$")
LONG = 0.0003  # seconds


def main(path: str) -> None:
    runs: dict[int, list[tuple[float, float, str]]] = defaultdict(list)
    waits: list[tuple[int, float, float, float]] = []  # cpu, woken, ran, delay
    with open(path) as timehist:
        for line in timehist:
            match = LINE.match(line)
            if match is None:
                continue
            end, cpu, task, delay_ms, run_ms = match.groups()
            ran = float(end) - float(run_ms) / 1e3
            runs[int(cpu)].append((ran, float(end), task))
            if CHAIN.match(task):
                delay = float(delay_ms) / 1e3
                waits.append((int(cpu), ran - delay, ran, delay))
    behind = 0.0
    for cpu, woken, ran, delay in waits:
        if delay < 0.00005:
            continue
        for start, end, task in runs[cpu]:
            if end > woken and start < ran and task.startswith("python["):
                behind += min(end, ran) - max(start, woken)
    print(
        f"chain waits {len(waits)}, over 0.3 ms {sum(w[3] >= LONG for w in waits)}, "
        f"total {sum(w[3] for w in waits) * 1e3:.1f} ms, behind events {behind * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main(sys.argv[1])
