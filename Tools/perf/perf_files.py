#!/usr/bin/env python3
"""The files perf mode leaves in /tmp: list them, remove those of processes
that are gone, and copy a container's out to the host.

    perf_files.py list   [--dir DIR] [--older-than AGE]
    perf_files.py clean  [--dir DIR] [--older-than AGE] [--dry-run]
    perf_files.py export [--dir DIR] [--wait] [--force] PID...

The files: perf-PID.map (the perf map), jit-PID.dump (the jitdump of
-X perf_jit) and jitted-PID-N.so (made by `perf inject --jit` next to the
dump).  perf reads them after the process has exited, so nothing removes
them; on a machine that starts many processes they fill /tmp.

clean removes the files of processes that no longer exist, owned by the
caller, optionally only those last modified more than AGE ago (90, 90s,
15m, 1h, 2d).  It never follows a symbolic link and never removes one, nor
anything but a regular file, nor another user's file.  A file whose pid is
in use is kept, whichever process holds that pid now: a new process with a
recycled pid empties and reuses the same map, so the file may already be
its.  So is a file that any process we can see has open or mapped (a
process in another pid namespace that shares this directory writes under
its own pid).  Just before removing, the file is examined again and kept if
it changed; a file that vanished meanwhile is not an error.

export copies the perf map of each given process (its pid as this machine
sees it, as for `perf record -p`) out of its mount namespace, where a
container keeps its own /tmp, to DIR/perf-PID.map under the host pid: perf
looks there once the process, and with it the container's /tmp, is gone.
The file is read as /proc/PID/root/tmp/perf-NSPID.map, NSPID being the
process's pid in its own pid namespace, without following any symbolic
link inside the container; the copy is owner-only (0600), made under a
temporary name and put in place atomically, without following a link at
the destination.  A file there is replaced when it is an earlier copy of
the same map (the new one starts with it) or, in /tmp, a leftover of an
earlier process that had the same pid (last written before this one
started, and open in no process); any other only with --force (in
another directory, it may be a map kept on purpose), and never one of
another user.  Without --wait the copy holds what the map held at that
moment (whole lines only); with --wait the command holds the files open
until every process has exited and copies them complete.

A process's jitdump is copied the same way only when the process is in
this pid namespace (a container that has only its own /tmp, or a systemd
service with PrivateTmp=yes): `perf inject --jit` (perf 6.1) finds the
dump by the name the process gave it, jit-NSPID.dump, which it matches
with the process's pid in its namespace, and it can read that only while
the process runs.  Run `perf inject` before a container exits.

Exit status: 0 when all went well, 1 when any file could not be removed
or copied (or a process was not found), 2 for bad arguments.
Standard library only, Python >= 3.8.
"""

import argparse
import os
import re
import secrets
import stat
import struct
import sys
import time

PROG = "perf_files.py"
# The kinds of files, by name; the group is the pid.
NAMES = {
    "map": re.compile(r"perf-([1-9][0-9]{0,9})\.map"),
    "jitdump": re.compile(r"jit-([1-9][0-9]{0,9})\.dump"),
    "jitted": re.compile(r"jitted-([1-9][0-9]{0,9})-[0-9]+\.so"),
}
AGE_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
JITDUMP_MAGIC = 0x4A695444
CHUNK = 1 << 16


class Failure(Exception):
    """Something the user must hear about; the exit status becomes 1."""


def kind_of(name):
    """(kind, pid) of a file name perf mode or perf inject makes, or None."""
    for kind, pattern in NAMES.items():
        match = pattern.fullmatch(name)
        if match:
            return kind, int(match.group(1))
    return None


def parse_age(text):
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]*)?)([smhd]?)", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"invalid age {text!r} (examples: 90, 90s, 15m, 1h, 2d)")
    return float(match.group(1)) * AGE_UNITS[match.group(2)]


def human_size(size):
    for unit in ("bytes", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{size} {unit}" if unit == "bytes" else \
                f"{size:.1f} {unit}"
        size /= 1024


def human_age(seconds):
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f} {unit}"
    return f"{max(seconds, 0):.0f} s"


def open_dir(path):
    """A descriptor of directory path, refusing a symbolic link."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                       | os.O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(path):
            raise Failure(f"{path} is a symbolic link (not followed)")
        raise Failure(f"cannot open directory {path}: {exc.strerror}")


def same_file(a, b):
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # someone else's process
        return True
    except OverflowError:            # larger than any pid
        return False
    return True


# -- list and clean ---------------------------------------------------------

class Entry:
    """A file of ours in the directory, and why it is kept (None: it may
    go)."""

    def __init__(self, name, kind, pid, st):
        self.name, self.kind, self.pid, self.st = name, kind, pid, st
        self.reason = None


def scan(dir_fd):
    entries = []
    for name in sorted(os.listdir(dir_fd)):
        found = kind_of(name)
        if found is None:
            continue
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:    # gone since the listing
            continue
        entries.append(Entry(name, *found, st))
    return entries


def files_in_use():
    """{(st_dev, st_ino): pid} of the perf files that a process we can see
    has open (a map stays open while its process runs) or mapped (a jitdump
    is mapped into its process)."""
    used = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            for key in open_perf_files(name) + mapped_perf_files(name):
                used.setdefault(key, int(name))
    return used


def open_perf_files(pid):
    fd_dir = f"/proc/{pid}/fd"
    keys = []
    try:
        fds = os.listdir(fd_dir)
    except OSError:                  # gone, or not ours to see
        return keys
    for fd in fds:
        try:
            # readlink first: stat only what is named like ours, so that a
            # descriptor on a hung network filesystem cannot stall us.
            if kind_of(os.path.basename(os.readlink(f"{fd_dir}/{fd}"))):
                st = os.stat(f"{fd_dir}/{fd}")
                keys.append((st.st_dev, st.st_ino))
        except OSError:
            continue
    return keys


def mapped_perf_files(pid):
    keys = []
    try:
        with open(f"/proc/{pid}/maps") as maps:
            lines = maps.readlines()
    except OSError:
        return keys
    for line in lines:
        fields = line.split(None, 5)
        if len(fields) == 6 and kind_of(os.path.basename(fields[5].strip())):
            major, minor = (int(part, 16) for part in fields[3].split(":"))
            keys.append((os.makedev(major, minor), int(fields[4])))
    return keys


def judge(entries, older_than, now):
    """Set each entry's reason to be kept, or leave it None."""
    euid = os.geteuid()
    used = None
    for entry in entries:
        st = entry.st
        if stat.S_ISLNK(st.st_mode):
            entry.reason = "symbolic link"
        elif not stat.S_ISREG(st.st_mode):
            entry.reason = "not a regular file"
        elif st.st_uid != euid:
            entry.reason = f"owned by uid {st.st_uid}"
        elif pid_alive(entry.pid):
            entry.reason = f"process {entry.pid} is running"
        elif older_than is not None and now - st.st_mtime < older_than:
            entry.reason = f"modified {human_age(now - st.st_mtime)} ago"
        else:
            if used is None:
                used = files_in_use()
            user = used.get((st.st_dev, st.st_ino))
            if user is not None:
                entry.reason = f"in use by process {user}"


def remove(dir_fd, entry):
    """Unlink entry if its name still holds the file judged and its pid is
    still free.  Returns None when removed, else why not: "gone" (it
    vanished meanwhile) or a reason to keep it."""
    try:
        st = os.stat(entry.name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return "gone"
    if not same_file(st, entry.st) or not stat.S_ISREG(st.st_mode):
        return "changed since it was examined"
    if pid_alive(entry.pid):
        return f"process {entry.pid} has started meanwhile"
    try:
        os.unlink(entry.name, dir_fd=dir_fd)
    except FileNotFoundError:
        return "gone"
    return None


def describe(path, entry, now):
    return (f"{path} ({human_size(entry.st.st_size)}, "
            f"{human_age(now - entry.st.st_mtime)} old)")


def command_list(args):
    dir_fd = open_dir(args.dir)
    now = time.time()
    entries = scan(dir_fd)
    judge(entries, args.older_than, now)
    for entry in entries:
        if entry.reason is None:
            verdict = f"removable: process {entry.pid} is gone"
        else:
            verdict = f"kept: {entry.reason}"
        print(f"{describe(os.path.join(args.dir, entry.name), entry, now)}"
              f"  {verdict}")
    return 0


def command_clean(args):
    dir_fd = open_dir(args.dir)
    now = time.time()
    entries = scan(dir_fd)
    judge(entries, args.older_than, now)
    verb = "would remove" if args.dry_run else "removed"
    removed, failed = [], 0
    for entry in entries:
        if entry.reason is not None:
            continue
        path = os.path.join(args.dir, entry.name)
        if not args.dry_run:
            try:
                entry.reason = remove(dir_fd, entry)
            except OSError as exc:
                print(f"{PROG}: cannot remove {path}: {exc.strerror}",
                      file=sys.stderr)
                failed += 1
                continue
        if entry.reason == "gone":
            print(f"{path}: already gone")
        elif entry.reason is not None:
            print(f"{path}: kept: {entry.reason}")
        else:
            removed.append(entry)
            print(f"{verb} {describe(path, entry, now)}")
    kept = sum(entry.reason not in (None, "gone") for entry in entries)
    freed = sum(entry.st.st_size for entry in removed)
    pids = {entry.pid for entry in removed}
    print(f"{verb} {len(removed)} files ({human_size(freed)}) of "
          f"{len(pids)} processes; kept {kept}"
          + (f"; {failed} failed" if failed else ""))
    return 1 if failed else 0


# -- export -----------------------------------------------------------------

def read_status(proc_fd):
    """/proc/PID/status as a dict; ProcessLookupError once PID is gone."""
    fd = os.open("status", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc_fd)
    with open(fd) as f:
        text = f.read()
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def start_time(proc_fd):
    """When the process started, in seconds since the epoch, to within a
    second (the kernel tells the boot time in whole seconds)."""
    fd = os.open("stat", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc_fd)
    with open(fd) as f:
        # The fields after the command name, which may hold anything, in
        # parentheses; the 22nd field, starttime, is in clock ticks since
        # boot.
        ticks = int(f.read().rpartition(")")[2].split()[19])
    with open("/proc/stat") as f:
        boot = next(int(line.split()[1]) for line in f
                    if line.startswith("btime "))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def open_in_container(tmp_fd, name, uids):
    """A read-only descriptor of the regular file tmp_fd/name, never
    following a symbolic link and never opening anything else (a FIFO or
    a device); None when there is no such file."""
    try:
        path_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=tmp_fd)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(path_fd)
        if stat.S_ISLNK(st.st_mode):
            raise Failure(f"{name} is a symbolic link: not followed")
        if not stat.S_ISREG(st.st_mode):
            raise Failure(f"{name} is not a regular file")
        if st.st_nlink != 1:
            raise Failure(f"{name} has other hard links")
        if st.st_uid not in uids:
            raise Failure(f"{name} belongs to uid {st.st_uid}, "
                          f"not to the process")
        # Reopen the very file examined, for reading.
        return os.open(f"/proc/self/fd/{path_fd}",
                       os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(path_fd)


class Target:
    """A process whose files are to be exported."""

    def __init__(self, pid):
        self.pid = pid
        try:
            self.proc_fd = os.open(f"/proc/{pid}", os.O_RDONLY
                                   | os.O_DIRECTORY | os.O_CLOEXEC)
            status = read_status(self.proc_fd)
        except (FileNotFoundError, ProcessLookupError):
            raise Failure(f"process {pid} does not exist")
        if status.get("State", "").startswith(("Z", "X")):
            raise Failure(f"process {pid} has exited")
        # NSpid: the pid in each pid namespace from ours down to its own.
        nspids = status.get("NSpid", str(pid)).split()
        self.nspid = int(nspids[-1])
        self.own_pidns = len(nspids) > 1
        self.uids = {int(uid) for uid in status["Uid"].split()}
        try:
            self.started = start_time(self.proc_fd)
        except (FileNotFoundError, ProcessLookupError):
            raise Failure(f"process {pid} has exited")
        self.tmp_fd = self.open_tmp()
        self.sources = {}            # kind -> descriptor

    def open_tmp(self):
        try:
            # /proc/PID/root is the process's root directory in its mount
            # namespace: a link meant to be followed.  Its tmp is not.
            root_fd = os.open("root", os.O_PATH | os.O_DIRECTORY
                              | os.O_CLOEXEC, dir_fd=self.proc_fd)
        except PermissionError:
            raise Failure(f"no access to the files of process {self.pid} "
                          f"(needs its user, or root)")
        except (FileNotFoundError, ProcessLookupError):
            raise Failure(f"process {self.pid} has exited")
        try:
            return os.open("tmp", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW
                           | os.O_CLOEXEC, dir_fd=root_fd)
        except OSError as exc:
            raise Failure(f"process {self.pid}: its /tmp is a symbolic "
                          f"link or no directory ({exc.strerror})")
        finally:
            os.close(root_fd)

    def source_name(self, kind):
        return f"perf-{self.nspid}.map" if kind == "map" \
            else f"jit-{self.nspid}.dump"

    def kinds(self):
        """What perf can use a copy of (see the module's docstring)."""
        return ("map",) if self.own_pidns else ("map", "jitdump")

    def open_sources(self):
        for kind in self.kinds():
            if kind not in self.sources:
                fd = open_in_container(self.tmp_fd, self.source_name(kind),
                                       self.uids)
                if fd is not None:
                    self.sources[kind] = fd

    def has_jitdump(self):
        try:
            os.stat(self.source_name("jitdump"), dir_fd=self.tmp_fd,
                    follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def exited(self):
        try:
            state = read_status(self.proc_fd).get("State", "")
        except ProcessLookupError:
            return True
        return state.startswith(("Z", "X"))


def complete_length(kind, fd):
    """How many bytes of the file hold whole map lines or whole jitdump
    records: a running process may be writing the next one."""
    size = os.fstat(fd).st_size
    if kind == "map":
        end = size
        while end > 0:
            start = max(0, end - CHUNK)
            newline = os.pread(fd, end - start, start).rfind(b"\n")
            if newline >= 0:
                return start + newline + 1
            end = start
        return 0
    header = os.pread(fd, 12, 0)
    order = next((o for o in "<>" if len(header) == 12 and
                  struct.unpack(o + "I", header[:4])[0] == JITDUMP_MAGIC),
                 None)
    if order is None:
        raise Failure("not a jitdump (bad magic)")
    offset = struct.unpack(order + "I", header[8:12])[0]
    while offset + 16 <= size:
        record_size = struct.unpack(order + "I",
                                    os.pread(fd, 4, offset + 4))[0]
        if record_size < 16 or offset + record_size > size:
            break
        offset += record_size
    return min(offset, size)


def write_temp(dest_fd, dest_name, src_fd, length):
    """Copy length bytes of src_fd into a new owner-only file next to
    dest_name; returns its name."""
    temp = f".{dest_name}.{secrets.token_hex(6)}.tmp"
    out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                  | os.O_CLOEXEC, 0o600, dir_fd=dest_fd)
    try:
        os.fchmod(out, 0o600)
        offset = 0
        while offset < length:
            data = os.pread(src_fd, min(CHUNK, length - offset), offset)
            if not data:
                raise Failure("the file shrank while it was copied")
            os.write(out, data)
            offset += len(data)
    except BaseException:
        os.unlink(temp, dir_fd=dest_fd)
        raise
    finally:
        os.close(out)
    return temp


def is_prefix(dest_fd, name, st, temp):
    """Does the file name (examined as st) hold the start of temp?"""
    try:
        old = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                      | os.O_CLOEXEC, dir_fd=dest_fd)
    except OSError:
        return False
    new = os.open(temp, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dest_fd)
    try:
        if not same_file(os.fstat(old), st) or \
                st.st_size > os.fstat(new).st_size:
            return False
        for offset in range(0, st.st_size, CHUNK):
            if os.pread(old, CHUNK, offset) != os.pread(new, CHUNK, offset):
                return False
        return True
    finally:
        os.close(old)
        os.close(new)


def replacement(dest_fd, name, temp, force, started):
    """How the existing file name is replaced by temp, its copy of a
    process that started at `started` (None: leftovers are kept):
    "replaced", or "replaced ..." with the reason; Failure says why it
    may not be."""
    try:
        st = os.stat(name, dir_fd=dest_fd, follow_symlinks=False)
    except FileNotFoundError:
        return "replaced"
    if stat.S_ISLNK(st.st_mode):
        # A rename replaces the link itself; it never writes its target.
        if force:
            return "replaced"
        raise Failure(f"{name} is a symbolic link (--force replaces it)")
    if not stat.S_ISREG(st.st_mode):
        raise Failure(f"{name} is not a regular file")
    if st.st_uid != os.geteuid():
        raise Failure(f"{name} belongs to uid {st.st_uid}")
    if force or is_prefix(dest_fd, name, st, temp):
        return "replaced"
    # Pids are reused: a file last written before the process started is
    # no copy of its map, and would name its code wrongly -- unless a
    # process still writes it (one in another pid namespace that shares
    # this /tmp, under the pid it has there).  (Two seconds' slack: the
    # start time is known to within one.)
    if started is not None and st.st_mtime < started - 2 \
            and (st.st_dev, st.st_ino) not in files_in_use():
        return "replaced a leftover of an earlier process with this pid"
    raise Failure(f"{name} exists and is not an earlier copy of this file "
                  f"(--force replaces it)")


def install(dest_fd, temp, name, force, started):
    """Give temp its final name; returns how ("created", "replaced ...")."""
    try:
        # A link never replaces an existing file: the atomic way to create.
        os.link(temp, name, src_dir_fd=dest_fd, dst_dir_fd=dest_fd,
                follow_symlinks=False)
        os.unlink(temp, dir_fd=dest_fd)
        return "created"
    except FileExistsError:
        pass
    except BaseException:
        os.unlink(temp, dir_fd=dest_fd)
        raise
    try:
        how = replacement(dest_fd, name, temp, force, started)
    except Failure:
        os.unlink(temp, dir_fd=dest_fd)
        raise
    os.replace(temp, name, src_dir_fd=dest_fd, dst_dir_fd=dest_fd)
    return how


def export_one(target, dest_fd, args):
    """Copy target's files; Failure when there was nothing to copy."""
    dest_dir = os.fstat(dest_fd)
    # Leftovers are replaced only where perf looks for maps.
    started = target.started if same_file(dest_dir, os.stat("/tmp")) \
        else None
    if not target.own_pidns and same_file(os.fstat(target.tmp_fd), dest_dir):
        print(f"process {target.pid} writes its files in {args.dir} "
              f"itself: nothing to export")
        return
    if "map" not in target.sources:
        raise Failure(f"process {target.pid} has no "
                      f"{target.source_name('map')} in its /tmp "
                      f"(is perf mode on?)")
    where = f"process {target.pid}" + (
        f" (pid {target.nspid} in its namespace)" if target.own_pidns
        else "")
    for kind, fd in sorted(target.sources.items(), reverse=True):
        name = ("perf-{}.map" if kind == "map" else "jit-{}.dump").format(
            target.pid)
        length = complete_length(kind, fd)
        temp = write_temp(dest_fd, name, fd, length)
        how = install(dest_fd, temp, name, args.force, started)
        print(f"{where}: {target.source_name(kind)} -> "
              f"{os.path.join(args.dir, name)} ({how}, {length} bytes)")
    if target.own_pidns and target.has_jitdump():
        print(f"{where}: {target.source_name('jitdump')} not copied: perf "
              f"inject reads a container's dump only while the process "
              f"runs")


def command_export(args):
    dest_fd = open_dir(args.dir)
    targets, status = [], 0
    for pid in args.pids:
        try:
            target = Target(pid)
            target.open_sources()
            targets.append(target)
        except Failure as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            status = 1
    if args.wait:
        while not all(target.exited() for target in targets):
            time.sleep(0.1)
            for target in targets:
                try:
                    target.open_sources()
                except Failure:
                    pass             # told when it is exported
    for target in targets:
        try:
            if args.wait:
                target.open_sources()
            export_one(target, dest_fd, args)
        except Failure as exc:
            print(f"{PROG}: process {target.pid}: {exc}", file=sys.stderr)
            status = 1
        except OSError as exc:
            print(f"{PROG}: process {target.pid}: {exc}", file=sys.stderr)
            status = 1
    return status


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, summary in (
            ("list", "list the perf files in DIR and what clean would do"),
            ("clean", "remove the perf files of processes that are gone")):
        command = commands.add_parser(name, help=summary)
        command.add_argument("--dir", default="/tmp",
                             help="where the files are (default: /tmp)")
        command.add_argument(
            "--older-than", type=parse_age, metavar="AGE",
            help="only files last modified more than AGE ago "
                 "(seconds, or with a unit: 90s, 15m, 1h, 2d)")
        if name == "clean":
            command.add_argument("--dry-run", action="store_true",
                                 help="only say what would be removed")
    export = commands.add_parser(
        "export", help="copy the perf maps of processes in containers to "
                       "DIR, under their host pids")
    export.add_argument("pids", type=int, nargs="+", metavar="PID",
                        help="the process's pid as seen here")
    export.add_argument("--dir", default="/tmp",
                        help="where to write the copies (default: /tmp)")
    export.add_argument("--wait", action="store_true",
                        help="copy when the processes have exited")
    export.add_argument("--force", action="store_true",
                        help="replace files that are not earlier copies")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    command = {"list": command_list, "clean": command_clean,
               "export": command_export}[args.command]
    try:
        return command(args)
    except Failure as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
