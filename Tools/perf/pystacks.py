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
    perf script -i perf.data | python pystacks.py --pprof app.pb.gz
    flamegraph.pl app.folded > app.svg
    npx speedscope app.json
    pprof -top app.pb.gz

A sample without any Python frame (start-up, the map flusher thread, C
code called from nowhere in Python) is [native] followed by its innermost
named C function, or by its shared object when perf named none:
[native];_dl_relocate_object.

--speedscope writes speedscope's JSON: one profile per thread (and perf
event), one sample per perf sample in perf's time order, each weighing
its sample period (nanoseconds for cpu-clock and task-clock); Python
frames carry their file, so two modules' <module> stay two frames.
--pprof writes a gzipped pprof profile.proto (Go's pprof, Pyroscope,
Parca): a sample count and the summed period per stack and thread.
Neither carries line numbers: the perf map names a function by qualified
name and file only.

The input is read as a stream; memory grows with the number of distinct
stacks (and, for --speedscope, by a few bytes per sample).  Lines that
cannot be parsed are counted and reported on stderr at the end.  Exit
status: 0 when at least one sample was read, 1 otherwise.  Standard
library only, Python >= 3.8.
"""

import argparse
import array
import collections
import functools
import gzip
import json
import os
import re
import sys

PY_PREFIX = "py::"
UNKNOWN = "[unknown]"
# perf's software timers count their period in nanoseconds.
CLOCK_EVENTS = ("cpu-clock", "task-clock")

# "    7f3e2a1b4c0 _PyEval_EvalFrameDefault+0x1230 (/usr/bin/python3.11)"
FRAME_LINE = re.compile(r"\s+([0-9a-fA-F]+)\s+(.*?)(?:\s+\((.*)\))?\s*$")
# "python 12345/12346 [001] 123.456789: 1010101 cpu-clock:ppp:" - the
# command name may hold spaces, the cpu, time, period and event fields may
# be missing, and a lone number is the thread id (perf script's default;
# -F +pid adds the process id in front).
HEADER_LINE = re.compile(
    r"(?P<comm>.*?)\s+(?P<first>-?\d+)(?:/(?P<tid>-?\d+))?"
    r"(?:\s+\[\d+\])?(?:\s+(?P<time>\d+\.\d+):)?"
    r"(?:\s+(?P<period>\d+)\s+(?P<event>\S+):(?=\s|$))?(?:\s.*)?$")
OFFSET = re.compile(r"\+0x[0-9a-fA-F]+$")
# perf's event modifiers, as in "cycles:ukppp" (perf list --help).
MODIFIERS = re.compile(r"[ukhIGHpPSDWeb]+")

# A frame of a folded stack: a Python function (name = qualified name,
# file = its source file) or a C one (name = symbol, file = the shared
# object perf found it in, "" when perf did not say).
Frame = collections.namedtuple("Frame", "name file python")
NATIVE = Frame("[native]", "", False)


class Sample:
    __slots__ = ("comm", "pid", "tid", "time", "period", "event", "frames")

    def __init__(self, comm, pid, tid, time, period, event):
        self.comm = comm
        self.pid = pid
        self.tid = tid
        self.time = time      # nanoseconds on perf's clock, or None
        self.period = period  # or None
        self.event = event    # "cpu-clock:ppp", or None
        self.frames = []      # (symbol, shared object), innermost first


def nanoseconds(text):
    """perf script's "951.744356" (or --ns "951.744356118") as an exact
    number of nanoseconds."""
    seconds, _, fraction = text.partition(".")
    return int(seconds) * 10**9 + int(fraction.ljust(9, "0")[:9])


def parse_header(line):
    match = HEADER_LINE.match(line)
    if match is None or not match.group("comm").strip():
        return None
    first = int(match.group("first"))
    if match.group("tid"):
        pid, tid = first, int(match.group("tid"))
    else:
        pid, tid = None, first
    time, period = match.group("time", "period")
    return Sample(match.group("comm").strip(), pid, tid,
                  nanoseconds(time) if time else None,
                  int(period) if period else None, match.group("event"))


def parse_frame(line):
    """A frame line's symbol without the +0x offset, and its shared
    object (a plain pair: Frames are made for the frames kept only)."""
    match = FRAME_LINE.match(line)
    if match is None:
        return None
    symbol = OFFSET.sub("", match.group(2).strip())
    return symbol or UNKNOWN, match.group(3) or ""


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


@functools.lru_cache(maxsize=None)   # as many as there are functions
def python_frame(symbol):
    """The Frame of a 'py::qualname:file' symbol."""
    qualname, _, filename = symbol[len(PY_PREFIX):].partition(":")
    return Frame(qualname, filename, True)


def native_leaf(frames):
    """What a sample without Python frames was running: its innermost
    named C function, or the shared object of its innermost frame."""
    for symbol, dso in frames:
        if symbol != UNKNOWN:
            return Frame(symbol, dso, False)
    dso = frames[0][1]
    if not dso or dso.startswith("["):   # "[kernel.kallsyms]", "[unknown]"
        return Frame(dso or UNKNOWN, dso, False)
    return Frame(f"[{os.path.basename(dso)}]", dso, False)


def fold(frames, mode):
    """The stack to report for a sample's frames (innermost first), as a
    tuple of Frames root first."""
    if mode == "all":
        return tuple(Frame(symbol, dso, False)
                     for symbol, dso in reversed(frames))
    python = [i for i, (symbol, _) in enumerate(frames)
              if symbol.startswith(PY_PREFIX)]
    if not python:
        return (NATIVE, native_leaf(frames))
    stack = [python_frame(frames[i][0]) for i in reversed(python)]
    if mode == "native-leaf":
        # The C code the innermost Python frame was running.
        stack.extend(Frame(symbol, dso, False)
                     for symbol, dso in reversed(frames[:python[0]]))
    return tuple(stack)


def label(frame, with_file):
    """A frame's name in folded output: 'qualname' or 'file:qualname'."""
    if with_file and frame.python:
        return f"{frame.file}:{frame.name}"
    return frame.name


def event_name(event):
    """"cpu-clock:ppp" without its modifiers ("sched:sched_switch" stays
    whole); "" when perf named none."""
    name, _, modifiers = (event or "").rpartition(":")
    return name if name and MODIFIERS.fullmatch(modifiers) else event or ""


def clock_event(event):
    """Does the event's period count nanoseconds?"""
    return event_name(event) in CLOCK_EVENTS


class Thread:
    """The samples of one thread and one perf event."""

    def __init__(self, sample, keep_samples):
        self.comm, self.pid, self.tid = sample.comm, sample.pid, sample.tid
        self.event = sample.event
        self.by_stack = {}         # stack id -> [samples, summed period]
        self.weighed = True        # every sample had a period
        self.timed = True          # every sample had a time
        self.samples = None
        if keep_samples:           # for time order: (time, period, stack)
            self.samples = (array.array("q"), array.array("q"),
                            array.array("q"))

    def add(self, sample, stack_id):
        period = sample.period or 0
        self.weighed = self.weighed and sample.period is not None
        self.timed = self.timed and sample.time is not None
        totals = self.by_stack.setdefault(stack_id, [0, 0])
        totals[0] += 1
        totals[1] += period
        if self.samples is not None:
            for column, value in zip(self.samples,
                                     (sample.time or 0, period, stack_id)):
                column.append(value)

    def name(self):
        ids = f"pid {self.pid}, tid {self.tid}" if self.pid is not None \
            else f"tid {self.tid}"
        event = event_name(self.event)
        return f"{self.comm} ({ids})" + (f" {event}" if event else "")

    def totals(self):
        """(samples, summed period) of the thread."""
        return tuple(map(sum, zip(*self.by_stack.values())))

    def in_time_order(self):
        """The stack ids and weights of the samples, in perf's time
        order (or as read, when perf script printed no times)."""
        times, periods, stack_ids = self.samples
        order = range(len(stack_ids))
        if self.timed:
            order = sorted(order, key=times.__getitem__)
        weights = [periods[i] for i in order] if self.weighed \
            else [1] * len(order)
        return [stack_ids[i] for i in order], weights


class Profile:
    """The selected samples: their distinct stacks, and per thread and
    event how often each stack was seen (and, to keep time order, every
    sample)."""

    def __init__(self, keep_samples):
        self.keep_samples = keep_samples
        self.stack_ids = {}   # tuple of Frames -> index in stacks
        self.stacks = []
        self.threads = {}     # (pid, tid, event) -> Thread
        self.time_span = None  # (first, last) sample time

    def add(self, sample, stack):
        stack_id = self.stack_ids.get(stack)
        if stack_id is None:
            stack_id = self.stack_ids[stack] = len(self.stacks)
            self.stacks.append(stack)
        key = (sample.pid, sample.tid, sample.event)
        thread = self.threads.get(key)
        if thread is None:
            thread = self.threads[key] = Thread(sample, self.keep_samples)
        thread.add(sample, stack_id)
        if sample.time is not None:
            low, high = self.time_span or (sample.time, sample.time)
            self.time_span = (min(low, sample.time), max(high, sample.time))

    def frame_ids(self):
        """Every frame of the stacks, numbered from 0 in order of first
        appearance."""
        ids = {}
        for stack in self.stacks:
            for frame in stack:
                ids.setdefault(frame, len(ids))
        return ids


def write_folded(profile, with_file, out):
    counts = {}
    for thread in profile.threads.values():
        for stack_id, (count, _) in thread.by_stack.items():
            text = ";".join(label(frame, with_file)
                            for frame in profile.stacks[stack_id])
            counts[text] = counts.get(text, 0) + count
    for text, count in sorted(counts.items(), key=lambda kv: -kv[1]):
        out.write(f"{text} {count}\n")


def speedscope_frame(frame):
    if frame.file:
        return {"name": frame.name, "file": frame.file}
    return {"name": frame.name}


def write_speedscope(profile, path, name):
    """speedscope's file format: per thread, a sampled profile with the
    samples in time order.  Written piece by piece: the samples list
    holds each sample's whole stack."""
    frame_ids = profile.frame_ids()
    stack_json = [json.dumps([frame_ids[f] for f in stack])
                  for stack in profile.stacks]
    threads = list(profile.threads.values())
    busiest = max(range(len(threads)), key=lambda i: threads[i].totals())
    head = {
        "$schema": "https://www.speedscope.app/file-format-schema.json",
        "exporter": "cpython-perf pystacks.py",
        "name": name,
        "activeProfileIndex": busiest,
        "shared": {"frames": [speedscope_frame(f) for f in frame_ids]},
    }
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(head)[:-1] + ', "profiles": [')
        for n, thread in enumerate(threads):
            stack_ids, weights = thread.in_time_order()
            fields = {"type": "sampled", "name": thread.name(),
                      "unit": "nanoseconds" if thread.weighed
                              and clock_event(thread.event) else "none",
                      "startValue": 0, "endValue": sum(weights)}
            f.write((", " if n else "") + json.dumps(fields)[:-1])
            f.write(', "samples": [')
            f.write(", ".join(stack_json[i] for i in stack_ids))
            f.write('], "weights": [')
            f.write(", ".join(map(str, weights)))
            f.write("]}")
        f.write("]}\n")


# pprof's profile.proto (github.com/google/pprof, proto/profile.proto),
# encoded by hand: a message is a sequence of fields, each a key
# (field number << 3 | wire type) followed by a varint (type 0) or a
# length and bytes (type 2).  Zero is every field's default and is left
# out; repeated numbers are packed.

def varint(value):
    value &= (1 << 64) - 1   # int64: negatives as two's complement
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def number_field(field, value):
    return varint(field << 3) + varint(value) if value else b""


def bytes_field(field, data):
    return varint(field << 3 | 2) + varint(len(data)) + data


def message(*fields):
    return b"".join(fields)


def packed_field(field, values):
    return bytes_field(field, b"".join(varint(v) for v in values))


class StringTable:
    """profile.proto's string_table: every string once, "" first."""

    def __init__(self):
        self.index = {"": 0}

    def __call__(self, text):
        return self.index.setdefault(text, len(self.index))

    def fields(self):
        return b"".join(bytes_field(6, s.encode("utf-8"))
                        for s in self.index)


def pprof_events(profile):
    """{event: (samples, summed period)} of the perf events whose every
    sample had a period: each gets a column of values in the profile."""
    events, unweighed = {}, set()
    for thread in profile.threads.values():
        if not thread.weighed:
            unweighed.add(thread.event)
        count, period = events.get(thread.event, (0, 0))
        samples, periods = thread.totals()
        events[thread.event] = (count + samples, period + periods)
    return {event: totals for event, totals in events.items()
            if event not in unweighed}


def pprof_samples(profile, frame_ids, strings, columns, width):
    """Sample messages, one per stack and thread: location ids leaf first
    (a location and a function per frame, both numbered frame id + 1),
    the values, and the thread as labels."""
    for thread in profile.threads.values():
        # Label: key = 1, str = 2, num = 3.
        labels = [message(number_field(1, strings("comm")),
                          number_field(2, strings(thread.comm))),
                  message(number_field(1, strings("tid")),
                          number_field(3, thread.tid))]
        if thread.pid is not None:
            labels.append(message(number_field(1, strings("pid")),
                                  number_field(3, thread.pid)))
        column = columns.get(thread.event)
        for stack_id, (count, period) in thread.by_stack.items():
            values = [count] + [0] * (width - 1)
            if column is not None:
                values[column] = period
            stack = profile.stacks[stack_id]
            # Sample: location_id = 1, value = 2, label = 3.
            yield message(
                packed_field(1, [frame_ids[f] + 1 for f in reversed(stack)]),
                packed_field(2, values),
                *(bytes_field(3, tag) for tag in labels))


def pprof_profile(profile):
    """The Profile message: sample types (the count, then one summed
    period per event), samples, locations, functions, duration and, for
    a single event, its mean period.  No time_nanos: perf's clock does
    not count from the epoch."""
    strings = StringTable()
    events = pprof_events(profile)
    frame_ids = profile.frame_ids()
    # ValueType: type = 1, unit = 2.
    value_types = [message(number_field(1, strings(kind)),
                           number_field(2, strings(unit)))
                   for kind, unit in [("samples", "count")] + [
                       (event_name(event) or "events",
                        "nanoseconds" if clock_event(event) else "count")
                       for event in events]]
    columns = {event: 1 + n for n, event in enumerate(events)}
    # Profile: sample_type = 1, sample = 2, mapping = 3, location = 4,
    # function = 5, string_table = 6, duration_nanos = 10,
    # period_type = 11, period = 12.
    fields = [bytes_field(1, vt) for vt in value_types]
    fields += [bytes_field(2, sample) for sample in pprof_samples(
        profile, frame_ids, strings, columns, len(value_types))]
    # One mapping (id = 1), whose functions and file names are known
    # (has_functions = 7, has_filenames = 8): perf symbolized them, and
    # readers need look for no binary to do it.
    fields.append(bytes_field(3, message(number_field(1, 1),
                                         number_field(7, True),
                                         number_field(8, True))))
    for frame, n in frame_ids.items():
        # Location: id = 1, mapping_id = 2, line = 4 (Line: function_id
        # = 1); Function: id = 1, name = 2, filename = 4.
        line = message(number_field(1, n + 1))
        fields.append(bytes_field(4, message(number_field(1, n + 1),
                                             number_field(2, 1),
                                             bytes_field(4, line))))
        fields.append(bytes_field(5, message(
            number_field(1, n + 1), number_field(2, strings(frame.name)),
            number_field(4, strings(frame.file)))))
    if profile.time_span is not None:
        first, last = profile.time_span
        fields.append(number_field(10, last - first))
    if len(events) == 1:
        (count, period), = events.values()
        fields.append(bytes_field(11, value_types[1]))
        fields.append(number_field(12, round(period / count)))
    # The strings last: the fields above add to the table.
    return message(*fields, strings.fields())


def write_pprof(profile, path):
    # mtime 0: the same samples give the same file.
    with open(path, "wb") as raw, \
            gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(pprof_profile(profile))


def selected(sample, args):
    return ((args.comm is None or sample.comm == args.comm)
            and (args.pid is None or sample.pid == args.pid)
            and (args.tid is None or sample.tid == args.tid))


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
                        help="name Python frames file:qualname in the "
                             "folded output")
    parser.add_argument("--speedscope", metavar="FILE",
                        help="also write speedscope's JSON format to FILE")
    parser.add_argument("--pprof", metavar="FILE",
                        help="also write a gzipped pprof profile to FILE")
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
    profile = Profile(keep_samples=args.speedscope is not None)
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
            profile.add(sample, fold(sample.frames, args.mode))
    write_folded(profile, args.file_names, sys.stdout)
    files = [path for path in (args.speedscope, args.pprof) if path]
    if files and not profile.threads:
        print(f"pystacks: no sample selected, {' and '.join(files)} not "
              "written", file=sys.stderr)
    elif files:
        if args.speedscope:
            write_speedscope(profile, args.speedscope,
                             "python" if args.input == "-" else args.input)
        if args.pprof:
            write_pprof(profile, args.pprof)
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
