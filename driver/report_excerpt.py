"""Print the hottest entry of `perf report --stdio -g` whose call chain
holds the demo's Python frames (py::baz -> py::bar -> py::foo)."""

import re
import sys

WANTED = ["baz", "bar", "foo"]
PY_FRAME = re.compile(r"\bpy::([^:\s]+):")


def entries(lines):
    """Yield each top-level report entry as a list of lines."""
    entry = []
    for line in lines:
        if re.match(r"\s+\d+\.\d+%", line) and entry:
            yield entry
            entry = []
        if entry or re.match(r"\s+\d+\.\d+%", line):
            entry.append(line.rstrip("\n"))
    if entry:
        yield entry


def shows_chain(entry):
    """Does one stack of the entry hold the wanted Python frames, one
    calling the next?  (perf report -g caller lists a stack outermost
    first.)"""
    frames = PY_FRAME.findall("\n".join(entry))
    return any(frames[i:i + len(WANTED)] == WANTED
               for i in range(len(frames)))


def main(path):
    with open(path, encoding="utf-8", errors="replace") as report:
        for entry in entries(report):
            if shows_chain(entry):
                print("\n".join(line for line in entry if line.strip()))
                return 0
    print("no entry shows the py::baz -> py::bar -> py::foo chain",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
