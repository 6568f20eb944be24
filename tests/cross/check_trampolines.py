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
MAP_DELAY_LIMIT = 5.0       # seconds; perf mode writes lines within 10 ms
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


# Per machine: ELF machine number, DWARF code alignment and return
# address column of the template's call frame information.
JITDUMP_MACHINE = {"x86_64": (62, 1, 16), "aarch64": (183, 4, 30)}


def number(data, offset, size):
    """A native-endian unsigned integer (the embedded interpreter has no
    _struct module)."""
    return int.from_bytes(data[offset:offset + size], sys.byteorder)


def read_jitdump():
    """The header's magic and machine, and [(name, code, unwinding)]."""
    with open(f"/tmp/jit-{os.getpid()}.dump", "rb") as f:
        data = f.read()
    header = (number(data, 0, 4), number(data, 12, 4))
    offset, loads, tables, short = number(data, 8, 4), [], None, 0
    while offset < len(data):
        kind, size = number(data, offset, 4), number(data, offset + 4, 4)
        body = data[offset + 16:offset + size]
        if kind == 4:       # unwinding information
            tables = body[24:24 + number(body, 0, 8)]
        elif kind == 0:     # code load
            code_size = number(body, 24, 8)
            name_end = body.index(b"\0", 40)
            loads.append((body[40:name_end].decode(), body[name_end + 1:],
                           tables))
            short += len(body) - name_end - 1 != code_size
        offset += size
    check(offset == len(data) and not short,
          f"{len(loads)} jitdump code loads fill the file exactly, each "
          f"with its code")
    return header, loads


def check_perf_jit():
    sys.activate_stack_trampoline("perf_jit")

    def jitted():
        return 42

    check(jitted() == 42, "perf_jit: a call returns through its trampoline")
    sys.deactivate_stack_trampoline()   # writes pending records out
    header, loads = read_jitdump()
    machine, code_align, return_column = JITDUMP_MACHINE[os.uname().machine]
    check(header == (0x4A695444, machine),
          f"jitdump header for ELF machine {header[1]}")
    mine = [load for load in loads if ".jitted:" in load[0]]
    check(len(mine) == 1, f"one code load for jitted ({len(mine)})")
    if not mine:
        return
    _, code, tables = mine[0]
    check(len({load[1] for load in loads}) == 1,
          f"every code load holds the {len(code)}-byte template")
    # The CIE: length, id 0, version 1, "zR", then code alignment, data
    # alignment (-8) and the return address column.
    cie = tables[4:16]
    check(cie[:8] == b"\0\0\0\0\x01zR\0"
          and cie[8] == code_align and cie[9] == 0x78
          and cie[10] == return_column,
          f"unwinding tables describe this machine's frame ({cie.hex()})")


def main():
    print(f"machine {os.uname().machine}", flush=True)
    check(sys.is_stack_trampoline_active(), "perf mode active")
    check_many_functions()
    entries = read_map([f"f{i}" for i in range(FUNCTIONS)])
    check_map(entries)
    check_chain()
    check_deactivated()
    check_perf_jit()
    os.unlink(f"/tmp/perf-{os.getpid()}.map")
    os.unlink(f"/tmp/jit-{os.getpid()}.dump")
    print(f"{len(failures)} failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
