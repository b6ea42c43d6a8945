"""Where a callgrind count of a Python server goes: the interpreter's dispatch loop, the rest of
libpython (objects, dicts, calls, allocation), and each other shared object, as shares of the total.

    python3 bench/instructions_split.py FILE.cg...   (callgrind_annotate must be on PATH)
"""

import collections
import re
import subprocess
import sys

_LINE = re.compile(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(\S+?):(\S+) \[(.*)\]")


def split(path: str) -> tuple[int, int, collections.Counter[str]]:
    text = subprocess.run(
        ["callgrind_annotate", "--threshold=100", path], capture_output=True, text=True, check=True
    ).stdout
    total, dispatch, by_object = 0, 0, collections.Counter[str]()
    for line in text.splitlines():
        if "PROGRAM TOTALS" in line:
            total = int(line.split()[0].replace(",", ""))
        match = _LINE.match(line)
        if match is None:
            continue
        count = int(match.group(1).replace(",", ""))
        source, function, shared_object = match.group(2), match.group(3), match.group(4)
        if "ceval.c" in source or "_PyEval_EvalFrameDefault" in function:
            dispatch += count
        else:
            by_object[shared_object.rsplit("/", 1)[-1]] += count
    return total, dispatch, by_object


for path in sys.argv[1:]:
    total, dispatch, by_object = split(path)
    print(f"{path}: {total:,} instructions")
    print(f"  {'interpreter dispatch (ceval.c)':<48} {100 * dispatch / total:5.1f} %")
    for name, count in by_object.most_common(6):
        print(f"  {name:<48} {100 * count / total:5.1f} %")
