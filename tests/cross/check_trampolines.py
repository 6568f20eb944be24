"""The Python half of the trampoline check (tests/test_cross.py), run by
fpwalk.c in perf mode on x86_64 and, under qemu, on aarch64.

Checks that many trampolines (several arenas' worth) return what the code
they run returns; that each has one well-formed map line, inside
read+execute memory that is never writable; and that the frame-pointer
chain seen from inside a call runs through the trampolines of exactly the
Python frames on the stack, in order.  Prints one line per check and exits
non-zero when any fails."""

import os
import re
import sys
import time

import _fpwalk

FUNCTIONS = 5_000           # enough trampolines for more than one arena
MAP_DELAY_LIMIT = 5.0       # seconds; perf mode writes lines within 1 ms
MAP_LINE = re.compile(r"([0-9a-f]+) ([0-9a-f]+) (py::\S.*)")

failures = []


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what, flush=True)
    if not ok:
        failures.append(what)


def read_map(wanted=()):
    """[(start, size, qualname)] from this process's perf map, once the
    qualnames in wanted are all there: perf mode writes its lines out
    shortly after it makes the trampolines, not at once."""
    start = time.monotonic()
    while True:
        with open(f"/tmp/perf-{os.getpid()}.map", encoding="utf-8") as f:
            lines = f.read().splitlines()
        names = {line.split(" ", 2)[-1][4:].split(":")[0] for line in lines}
        if set(wanted) <= names:
            break
        if time.monotonic() - start > MAP_DELAY_LIMIT:
            check(False, f"lines for {sorted(set(wanted) - names)[:3]} "
                         f"reach the map")
            break
        time.sleep(0.001)
    matches = [MAP_LINE.fullmatch(line) for line in lines]
    bad = [line for line, match in zip(lines, matches) if match is None]
    check(not bad, f"{len(lines)} map lines well formed (bad: {bad[:3]})")
    return [(int(m[1], 16), int(m[2], 16), m[3][4:].split(":")[0])
            for m in matches if m]


def mappings():
    """[(start, end, permissions)] from /proc/self/maps."""
    result = []
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            start, end = (int(x, 16) for x in span.split("-"))
            result.append((start, end, perms))
    return result


def name_at(entries, address):
    for start, size, name in entries:
        if start < address <= start + size:
            return name
    return None


def leaf(n):
    return n * 3 + 1, _fpwalk.return_addresses()


def middle(n):
    value, addresses = leaf(n + 1)
    return value + 1, addresses


def outer(n):
    value, addresses = middle(n * 2)
    return value + 1, addresses


def check_many_functions():
    source = "".join(f"def f{i}(x): return x * {i} + 7\n"
                     for i in range(FUNCTIONS))
    namespace = {}
    exec(compile(source, "generated.py", "exec"), namespace)
    wrong = [i for i in range(FUNCTIONS) if namespace[f"f{i}"](3) != 3 * i + 7]
    check(not wrong, f"{FUNCTIONS} functions return through their "
                     f"trampolines (wrong: {wrong[:5]})")


def check_map(entries):
    names = [name for _, _, name in entries]
    generated = [n for n in names if re.fullmatch(r"f\d+", n)]
    check(len(generated) == FUNCTIONS
          and len(set(generated)) == FUNCTIONS,
          f"one map line per generated function ({len(generated)})")
    sizes = {size for _, size, _ in entries}
    check(len(sizes) == 1, f"one trampoline size {sorted(sizes)}")
    spans = sorted((start, start + size) for start, size, _ in entries)
    overlaps = sum(1 for a, b in zip(spans, spans[1:]) if a[1] > b[0])
    check(overlaps == 0, "trampolines do not overlap")
    maps = mappings()
    homes = set()
    for start, end in spans:
        home = [m for m in maps if m[0] <= start and end <= m[1]]
        homes.update(home)
        if not home or "x" not in home[0][2] or "w" in home[0][2]:
            check(False, f"trampoline {start:#x} is in r-x memory {home}")
            return
    check(True, f"{len(spans)} trampolines in {len(homes)} r-x mappings, "
                "none writable")


def check_chain():
    value, addresses = outer(5)
    check(value == 36, f"outer(5) returns through the trampolines ({value})")
    entries = read_map(["leaf", "middle", "outer", "check_chain"])
    named = [name_at(entries, a) for a in addresses]
    chain = [n for n in named if n is not None]
    expected = ["leaf", "middle", "outer", "check_chain", "main", "<module>"]
    check(chain == expected,
          "frame-pointer chain: " + " <- ".join(chain))
    # A trampoline's own frame record holds the return address into the C
    # code that called it; without that record on the chain, a caller's
    # frame goes missing and two trampolines end up next to each other.
    adjacent = [(a, b) for a, b in zip(named, named[1:]) if a and b]
    check(not adjacent, f"a C frame between every two trampolines "
                        f"(adjacent: {adjacent})")


def check_deactivated():
    sys.deactivate_stack_trampoline()
    _, addresses = outer(1)
    entries = read_map()
    chain = [n for n in map(lambda a: name_at(entries, a), addresses) if n]
    # Only the frames entered before deactivation keep theirs.
    check(chain == ["check_deactivated", "main", "<module>"],
          "once deactivated, new calls run without trampolines: "
          + " <- ".join(chain))


def main():
    print(f"machine {os.uname().machine}", flush=True)
    check(sys.is_stack_trampoline_active(), "perf mode active")
    check_many_functions()
    entries = read_map([f"f{i}" for i in range(FUNCTIONS)])
    check_map(entries)
    check_chain()
    check_deactivated()
    os.unlink(f"/tmp/perf-{os.getpid()}.map")
    print(f"{len(failures)} failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
