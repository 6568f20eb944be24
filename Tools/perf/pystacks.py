#!/usr/bin/env python3
"""Fold `perf script` output into Python-level stacks.

perf record -g of an interpreter running with -X perf sees every Python
function as a py::<qualname>:<filename> frame, each wrapped in interpreter
plumbing (_PyEval_EvalFrameDefault and friends).  This keeps the Python
frames, folds identical stacks and prints them root first, one line each,
as flame graph tools read them ("folded" stacks):

    <module>;baz;bar;foo 1234

Example:

    perf record -F 999 -g -o perf.data python -X perf app.py
    perf script -i perf.data | python pystacks.py > app.folded
    perf script -i perf.data | python pystacks.py --speedscope app.json
    npx speedscope app.json

The input is read as a stream, so its size does not matter; memory grows
with the number of distinct stacks only.  Lines that cannot be parsed are
counted and reported on stderr at the end.  Exit status: 0 when at least
one sample was read, 1 otherwise.  Standard library only, Python >= 3.8.
"""

import argparse
import json
import re
import sys

PY_PREFIX = "py::"
NATIVE = "[native]"

# "    7f3e2a1b4c0 _PyEval_EvalFrameDefault+0x1230 (/usr/bin/python3.11)"
FRAME_LINE = re.compile(r"\s+([0-9a-fA-F]+)\s+(.*?)(?:\s+\((.*)\))?\s*$")
# "python 12345/12346 [001] 123.456789: 1010101 cpu-clock:ppp:" - the
# command name may hold spaces, the cpu and time fields may be missing, and
# a lone number is the thread id (perf script's default; -F +pid adds the
# process id in front).
HEADER_LINE = re.compile(
    r"(?P<comm>.*?)\s+(?P<first>-?\d+)(?:/(?P<tid>-?\d+))?"
    r"(?:\s+\[\d+\])?(?:\s+\d+\.\d+:)?(?:\s.*)?$")
OFFSET = re.compile(r"\+0x[0-9a-fA-F]+$")


class Sample:
    __slots__ = ("comm", "pid", "tid", "frames")

    def __init__(self, comm, pid, tid):
        self.comm = comm
        self.pid = pid
        self.tid = tid
        self.frames = []  # innermost first, as perf script prints them


def parse_header(line):
    match = HEADER_LINE.match(line)
    if match is None or not match.group("comm").strip():
        return None
    first = int(match.group("first"))
    if match.group("tid"):
        pid, tid = first, int(match.group("tid"))
    else:
        pid, tid = None, first
    return Sample(match.group("comm").strip(), pid, tid)


def parse_frame(line):
    """The symbol of a frame line, without its +0x offset."""
    match = FRAME_LINE.match(line)
    if match is None:
        return None
    symbol = OFFSET.sub("", match.group(2).strip())
    return symbol or "[unknown]"


def read_samples(lines, errors):
    """Yield the samples of `perf script` text; errors counts lines that
    were neither a sample header nor a frame."""
    sample = None
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            if sample is not None:
                yield sample
            sample = None
        elif line[0] in " \t":
            frame = parse_frame(line)
            if frame is None or sample is None:
                errors["lines"] += 1
            else:
                sample.frames.append(frame)
        else:
            if sample is not None:
                yield sample
            sample = parse_header(line)
            if sample is None:
                errors["lines"] += 1
    if sample is not None:
        yield sample


def python_name(symbol, with_file):
    """'py::qualname:file' as 'qualname' or 'file:qualname'."""
    qualname, _, filename = symbol[len(PY_PREFIX):].partition(":")
    return f"{filename}:{qualname}" if with_file else qualname


def fold(frames, mode, with_file):
    """The stack to report for a sample's frames (innermost first), as a
    list root first."""
    if mode == "all":
        return frames[::-1]
    python = [i for i, f in enumerate(frames) if f.startswith(PY_PREFIX)]
    if not python:
        return [NATIVE]
    stack = [python_name(frames[i], with_file) for i in reversed(python)]
    if mode == "native-leaf":
        # The C code the innermost Python frame was running.
        stack.extend(reversed(frames[:python[0]]))
    return stack


def selected(sample, args):
    return ((args.comm is None or sample.comm == args.comm)
            and (args.pid is None or sample.pid == args.pid)
            and (args.tid is None or sample.tid == args.tid))


def write_folded(counts, out):
    for stack, count in sorted(counts.items(), key=lambda kv: -kv[1]):
        out.write(f"{';'.join(stack)} {count}\n")


def write_speedscope(counts, path, name):
    """speedscope's file format: a sampled profile, each distinct stack
    once with its sample count as weight."""
    frames, index = [], {}
    samples, weights = [], []
    for stack, count in counts.items():
        ids = []
        for frame in stack:
            if frame not in index:
                index[frame] = len(frames)
                frames.append({"name": frame})
            ids.append(index[frame])
        samples.append(ids)
        weights.append(count)
    total = sum(weights)
    document = {
        "$schema": "https://www.speedscope.app/file-format-schema.json",
        "exporter": "cpython-perf pystacks.py",
        "name": name,
        "activeProfileIndex": 0,
        "shared": {"frames": frames},
        "profiles": [{
            "type": "sampled",
            "name": name,
            "unit": "none",
            "startValue": 0,
            "endValue": total,
            "samples": samples,
            "weights": weights,
        }],
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(document, f)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", nargs="?", default="-",
                        help="perf script output (default: stdin)")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--native-leaf", dest="mode", action="store_const",
                       const="native-leaf",
                       help="keep the native frames above the innermost "
                            "Python frame (where C time goes)")
    modes.add_argument("--all", dest="mode", action="store_const",
                       const="all",
                       help="every frame perf saw, unchanged")
    parser.add_argument("--file-names", action="store_true",
                        help="name Python frames file:qualname")
    parser.add_argument("--speedscope", metavar="FILE",
                        help="also write speedscope's JSON format to FILE")
    parser.add_argument("--comm", help="only samples of this command")
    parser.add_argument("--pid", type=int,
                        help="only this process (needs perf script -F +pid:"
                             " by default perf script shows thread ids only)")
    parser.add_argument("--tid", type=int, help="only this thread")
    parser.set_defaults(mode="python")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    errors = {"lines": 0, "no_pid": 0}
    counts = {}
    total = 0
    if args.input == "-":
        source = sys.stdin
        source.reconfigure(errors="replace")
    else:
        source = open(args.input, encoding="utf-8", errors="replace")
    with source:
        for sample in read_samples(source, errors):
            total += 1
            if args.pid is not None and sample.pid is None:
                errors["no_pid"] += 1
            if not sample.frames or not selected(sample, args):
                continue
            stack = tuple(fold(sample.frames, args.mode, args.file_names))
            counts[stack] = counts.get(stack, 0) + 1
    write_folded(counts, sys.stdout)
    if args.speedscope:
        write_speedscope(counts, args.speedscope,
                         "python" if args.input == "-" else args.input)
    if errors["lines"]:
        print(f"pystacks: {errors['lines']} line(s) could not be parsed",
              file=sys.stderr)
    if errors["no_pid"]:
        print(f"pystacks: --pid left out {errors['no_pid']} sample(s) "
              "without a process id; run perf script -F +pid",
              file=sys.stderr)
    if total == 0:
        print("pystacks: no samples in the input", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # e.g. piped into head
        sys.stderr.close()
        sys.exit(0)
