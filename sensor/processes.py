"""Process metadata for sockets: a psutil-backed cache of ``packetless.Process`` records.

Also the Netlink-mode lineage feed (exec/exit events from periodic /proc scans) for the
``meta.processes`` topic, and the redaction of secrets in command lines.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import psutil

import schemas
from sensor.cgroups import CgroupResolver, cgroup_of_pid, container_from_cgroup_path

log = logging.getLogger(__name__)

REDACTED = "<redacted>"
_SECRET_WORDS = (r"pass(?:word|wd)?|pwd|token|secret|api[-_]?key|access[-_]?key|private[-_]?key"
                 r"|credentials?")
# psutil's start time is boot time (whole seconds, /proc/stat btime) + start ticks: a kernel
# start time converted another way may differ by up to a second.
START_TIME_TOLERANCE_MS = 1000
KTHREADD = 2
# Published command lines are cut to this (per argument, then in total) after redaction (linear
# in the length): a 2 MB command line must not exceed Kafka's message size.
ARG_CHARS = 8192
ARGS_CHARS = 32768
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_MYSQL_FAMILY = frozenset({"mysql", "mysqldump", "mysqladmin", "mysqlimport", "mysqlshow",
                           "mysqlcheck", "mariadb", "mariadb-dump", "mariadb-admin"})


@dataclass(frozen=True)
class RedactRule:
    """A secret in a command line.

    ``pattern`` is searched in each argument. If it has a group named ``secret`` that
    matched, that span is replaced; if the group exists but did not take part (``--password``
    alone), or ``next_arg`` is set, the following argument is replaced; a pattern without
    such a group replaces the whole argument. ``programs`` limits the rule to commands whose
    argv[0] base name is listed.
    """

    pattern: re.Pattern[str]
    next_arg: bool = False
    programs: frozenset[str] | None = None

    @classmethod
    def of(cls, rule: RedactRule | str) -> RedactRule:
        """A rule from a rule or a regular expression string (configuration files give those)."""
        return rule if isinstance(rule, RedactRule) else cls(re.compile(rule))


DEFAULT_REDACT_RULES: tuple[RedactRule, ...] = (
    # --password=x, --db-password x, --token x, --api-key=x, -password x
    RedactRule(re.compile(rf"(?i)^--?(?=[\w.-]*(?:{_SECRET_WORDS}))[\w.-]*+"
                          r"(?:=(?P<secret>.+))?$")),
    # token=x, PGPASSWORD=x, AWS_SECRET_ACCESS_KEY=x, ?access_token=x in URLs
    RedactRule(re.compile(rf"(?i)(?:^|[?&;,\s])(?=[\w.-]*(?:{_SECRET_WORDS}))[\w.-]*+="
                          r"(?P<secret>[^&;,\s]+)")),
    # scheme://user:password@host
    RedactRule(re.compile(r"://[^/:@\s]+:(?P<secret>[^@/\s]+)@")),
    # mysql -p<password> (attached; "-p" alone prompts)
    RedactRule(re.compile(r"^-p(?P<secret>.+)$"), programs=_MYSQL_FAMILY),
    # sshpass -p <password>
    RedactRule(re.compile(r"^-p$"), next_arg=True, programs=frozenset({"sshpass"})),
)


def redact(args: Sequence[str],
           rules: Iterable[RedactRule | str] = DEFAULT_REDACT_RULES) -> list[str]:
    """A copy of ``args`` with secrets replaced by ``<redacted>`` (see ``RedactRule``)."""
    compiled = [RedactRule.of(r) for r in rules]
    program = os.path.basename(args[0]) if args else ""
    out = list(args)
    redact_next = False
    for index in range(len(out)):
        if redact_next:
            out[index] = REDACTED
            redact_next = False
            continue
        for rule in compiled:
            if rule.programs is not None and program not in rule.programs:
                continue
            text = out[index]
            if rule.pattern.groupindex.get("secret") is None:
                if rule.pattern.search(text):
                    if rule.next_arg:
                        redact_next = True
                    else:
                        out[index] = REDACTED
                continue
            pieces: list[str] = []
            last = 0
            for match in rule.pattern.finditer(text):
                if match.group("secret") is None:
                    redact_next = True
                    continue
                start, end = match.span("secret")
                pieces += [text[last:start], REDACTED]
                last = end
            out[index] = "".join(pieces) + text[last:]
            redact_next = redact_next or (rule.next_arg and bool(pieces))
    return out


@lru_cache(maxsize=4096)
def user_name(uid: int) -> str | None:
    """Name of ``uid`` on this host, None when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


@lru_cache(maxsize=4096)
def group_name(gid: int) -> str | None:
    """Name of ``gid`` on this host, None when it has none."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


def process_record(**values: Any) -> dict[str, Any]:
    """A ``packetless.Process`` dict: schema defaults overridden by ``values`` (names checked)."""
    return schemas.record("Process", **values)


def _start_ms(proc: psutil.Process) -> int:
    return round(proc.create_time() * 1000)


def start_ticks(pid: int, proc: str = "/proc") -> int | None:
    """Start time of ``pid`` in clock ticks after boot (/proc/<pid>/stat field 22), None if
    it is gone: one read, a fifth of what psutil.Process(pid) costs."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2:].split(None, 20)[19])
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class ProcessCache:
    """Completes kernel-reported process facts with /proc, cached by (pid, start time).

    A pid whose process started after the kernel event (pid reuse) or that has exited keeps
    only the kernel fields; the rest stay null. A hit costs one read of /proc/<pid>/stat (the
    start time that names the process); psutil reads the rest once per process.
    """

    redact_rules: Sequence[RedactRule | str] = DEFAULT_REDACT_RULES
    cgroups: CgroupResolver | None = None
    max_entries: int = 65536
    proc: Path = Path("/proc")
    _entries: OrderedDict[tuple[int, int], dict[str, Any]] = field(
        default_factory=OrderedDict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _boot_time: float = field(default_factory=psutil.boot_time, init=False, repr=False)

    def lookup(self, pid: int, *, comm: str | None = None, tid: int | None = None,
               uid: int | None = None, gid: int | None = None, cgroup_id: int | None = None,
               start_time_ms: int | None = None) -> dict[str, Any]:
        """The ``packetless.Process`` record of ``pid``; keyword arguments are kernel facts."""
        kernel = {k: v for k, v in (("comm", comm), ("tid", tid), ("uid", uid), ("gid", gid),
                                    ("cgroup_id", cgroup_id)) if v is not None}
        started = self.start_ms(pid)
        if started is None:
            return self._vanished(pid, kernel, start_time_ms)
        key = (pid, started)
        if start_time_ms is not None and abs(key[1] - start_time_ms) > START_TIME_TOLERANCE_MS:
            return self._vanished(pid, kernel, start_time_ms)
        with self._lock:
            cached = self._entries.get(key)
            if cached is not None:
                self._entries.move_to_end(key)
        if cached is None:
            cached = self._read(pid, key[1])
            if cached is None:
                return self._vanished(pid, kernel, start_time_ms)
            with self._lock:
                self._entries[key] = cached
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        record = dict(cached)
        record.update(kernel)
        if "uid" in kernel:
            record["user_name"] = user_name(uid)  # type: ignore[arg-type]
        if "gid" in kernel:
            record["group_name"] = group_name(gid)  # type: ignore[arg-type]
        if "cgroup_id" in kernel and self.cgroups is not None:
            path = self.cgroups.path_of(kernel["cgroup_id"])
            if path is not None:
                record["cgroup_path"] = path
                ref = container_from_cgroup_path(path)
                record["container_id"] = ref.container_id if ref else None
        return record

    def start_ms(self, pid: int) -> int | None:
        """Start time of ``pid`` in epoch milliseconds (as psutil computes it), None if gone."""
        ticks = start_ticks(pid, str(self.proc))
        return None if ticks is None else round((self._boot_time + ticks / CLOCK_TICKS) * 1000)

    def forget(self, pid: int, start_time_ms: int) -> None:
        """Drop a process that exited."""
        with self._lock:
            self._entries.pop((pid, start_time_ms), None)

    def _vanished(self, pid: int, kernel: dict[str, Any],
                  start_time_ms: int | None) -> dict[str, Any]:
        record = process_record(pid=pid, comm=kernel.get("comm", ""), tid=kernel.get("tid"),
                                uid=kernel.get("uid"), gid=kernel.get("gid"),
                                start_time_ms=start_time_ms, cgroup_id=kernel.get("cgroup_id"))
        if self.cgroups is not None and record["cgroup_id"] is not None:
            record["cgroup_path"] = self.cgroups.path_of(record["cgroup_id"])
            ref = container_from_cgroup_path(record["cgroup_path"] or "")
            record["container_id"] = ref.container_id if ref else None
        if record["uid"] is not None:
            record["user_name"] = user_name(record["uid"])
        if record["gid"] is not None:
            record["group_name"] = group_name(record["gid"])
        return record

    def _read(self, pid: int, start_ms: int) -> dict[str, Any] | None:
        """Everything /proc says about process (``pid``, ``start_ms``); None if it exited (or
        the pid was reused) meanwhile."""
        values: dict[str, Any] = {"pid": pid, "start_time_ms": start_ms}
        try:
            proc = psutil.Process(pid)
            if abs(_start_ms(proc) - start_ms) > START_TIME_TOLERANCE_MS:
                return None
            with proc.oneshot():
                values["comm"] = text(proc.name())
                uids, gids = proc.uids(), proc.gids()
                values["uid"], values["gid"] = uids.real, gids.real
                values["ppid"] = proc.ppid()
                values["exe"] = _executable(pid, self.proc)
                # redacted whole, then cut: a cut must not split a secret from its marker
                values["args"] = bounded(redact([text(a) for a in _allowed(proc.cmdline) or []],
                                                self.redact_rules))
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return None
        values["user_name"] = user_name(values["uid"])
        values["group_name"] = group_name(values["gid"])
        values["parent_name"] = _parent_name(values["ppid"])
        path = cgroup_of_pid(proc.pid, self.proc)
        if path is not None:
            values["cgroup_path"] = path
            values["cgroup_id"] = self._cgroup_id(path)
            ref = container_from_cgroup_path(path)
            values["container_id"] = ref.container_id if ref else None
        return process_record(**values)

    def _cgroup_id(self, path: str) -> int | None:
        if self.cgroups is None:
            self.cgroups = CgroupResolver()
        return self.cgroups.id_of(path)


def text(value: str) -> str:
    """``value`` as valid UTF-8: bytes /proc gave that are not UTF-8 (psutil keeps them as
    surrogate escapes, which Avro cannot encode) become U+FFFD."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def bounded(args: list[str]) -> list[str]:
    """``args`` cut to ARG_CHARS per argument and ARGS_CHARS in total; the last element then
    says how much was left out."""
    out: list[str] = []
    total = 0
    for index, arg in enumerate(args):
        if total + min(len(arg), ARG_CHARS) > ARGS_CHARS:
            left = sum(len(a) for a in args[index:])
            out.append(f"<truncated: {len(args) - index} more arguments, {left} characters>")
            return out
        if len(arg) > ARG_CHARS:
            arg = f"{arg[:ARG_CHARS]}<truncated: {len(arg) - ARG_CHARS} characters>"
        out.append(arg)
        total += len(arg)
    return out


def _executable(pid: int, proc: Path) -> str | None:
    """/proc/<pid>/exe; None when denied (another user's process without CAP_SYS_PTRACE, where
    psutil would guess argv[0], which the process chooses itself) or gone."""
    try:
        return text(os.readlink(proc / str(pid) / "exe"))
    except OSError:
        return None


def _allowed(getter: Callable[[], Any]) -> Any:
    """``getter()``, or None when /proc denies it (another user's process, unprivileged)."""
    try:
        return getter()
    except psutil.AccessDenied:
        return None


def _parent_name(ppid: int) -> str | None:
    if ppid <= 0:
        return None
    try:
        return text(psutil.Process(ppid).name())
    except psutil.Error:
        return None


# ---- lineage (Netlink mode): exec/exit by periodic /proc scans -------------------------------


@dataclass
class ProcessOptions:
    """Settings of the /proc-scan lineage feed."""

    host_name: str
    interval_s: float = 2.0
    cache: ProcessCache = field(default_factory=ProcessCache)


def process_event(**values: Any) -> dict[str, Any]:
    """A ``packetless.ProcessEvent`` dict from schema defaults and ``values`` (names checked)."""
    return schemas.record("ProcessEvent", **values)


class LineageScanner:
    """Diffs successive /proc scans into EXEC, EXIT and (first scan) RUNNING events.

    A process is (pid, start time); one whose name changed between scans has exec'd again.
    Kernel threads are left out (they rename themselves). Processes that live shorter than
    the scan interval are not seen: the eBPF mode's sched tracepoints catch those.
    """

    def __init__(self, options: ProcessOptions) -> None:
        self.options = options
        self._known: dict[tuple[int, int], tuple[str, dict[str, Any]]] | None = None

    def scan(self) -> list[tuple[str, dict[str, Any]]]:
        """One scan: the (key, ProcessEvent) pairs to publish."""
        now_ms = round(time.time() * 1000)
        current: dict[tuple[int, int], str] = {}
        for proc in psutil.process_iter(["name", "create_time", "ppid"]):
            info = proc.info
            if info["create_time"] is None or KTHREADD in (proc.pid, info["ppid"]):
                continue
            current[(proc.pid, round(info["create_time"] * 1000))] = info["name"] or ""
        first = self._known is None
        known = self._known or {}
        events: list[tuple[str, dict[str, Any]]] = []
        seen: dict[tuple[int, int], tuple[str, dict[str, Any]]] = {}
        for key, name in current.items():
            previous = known.get(key)
            if previous is not None and previous[0] == name:
                seen[key] = previous
                continue
            if previous is not None:
                self.options.cache.forget(*key)
            record = self.options.cache.lookup(key[0], comm=name, start_time_ms=key[1])
            seen[key] = (name, record)
            events.append(self._event("RUNNING" if first else "EXEC", now_ms, record))
        for key, (_name, record) in known.items():
            if key not in current:
                self.options.cache.forget(*key)
                events.append(self._event("EXIT", now_ms, record))
        self._known = seen
        return events

    def _event(self, kind: str, now_ms: int, record: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        key = f"{self.options.host_name}:{record['pid']}"
        return key, process_event(type=kind, timestamp_ms=now_ms, host_name=self.options.host_name,
                                  source="PROC_SCAN", process=record)


def run(publish: Callable[[str, str, dict[str, Any]], None], stop: threading.Event,
        options: ProcessOptions) -> None:
    """Publish lineage events on ``meta.processes`` every ``interval_s`` until ``stop`` is set."""
    scanner = LineageScanner(options)
    while not stop.is_set():
        for key, event in scanner.scan():
            publish("meta.processes", key, event)
        stop.wait(options.interval_s)
