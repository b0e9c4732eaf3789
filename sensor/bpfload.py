"""Compiles a BPF C source with bcc in a short-lived child process, which hands back the file
descriptors of its maps, programs and tracepoint attachments over a Unix socket (SCM_RIGHTS):
the caller never loads libbcc and its LLVM (~127 MiB resident); it uses the maps through
libbpf.so.1 (no LLVM) with the key and value layouts bcc derived from the C source.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import functools
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BATCH = 4096  # entries per BPF_MAP_LOOKUP_BATCH call
MESSAGE_MAX = 1 << 20  # the child's description of what it loaded (JSON), at most
FDS_MAX = 253  # SCM_MAX_FD
DIAGNOSTICS_MAX = 4000  # characters of the compiler's output kept in an error
REPO = Path(__file__).resolve().parent.parent
RingCallback = Callable[[Any, Any, int], int]
_RING_CB = ct.CFUNCTYPE(ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_size_t)


class LoadError(RuntimeError):
    """The child could not compile or load the program; the message has its diagnostics."""


@functools.cache
def libbpf() -> ct.CDLL:
    """libbpf.so.1, loaded on first use (a host without it can still run in Netlink mode)."""
    lib = ct.CDLL("libbpf.so.1", use_errno=True)
    for name in ("bpf_map_lookup_elem", "bpf_map_update_elem", "bpf_map_lookup_and_delete_elem"):
        getattr(lib, name).argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p] + (
            [ct.c_uint64] if name == "bpf_map_update_elem" else [])
    lib.bpf_map_lookup_batch.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_void_p,
                                         ct.c_void_p, ct.POINTER(ct.c_uint32), ct.c_void_p]
    lib.bpf_link_create.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.c_void_p]
    lib.ring_buffer__new.restype = ct.c_void_p
    lib.ring_buffer__new.argtypes = [ct.c_int, _RING_CB, ct.c_void_p, ct.c_void_p]
    lib.ring_buffer__epoll_fd.argtypes = [ct.c_void_p]
    lib.ring_buffer__free.argtypes = [ct.c_void_p]
    return lib


@functools.cache
def _libbpf_keeping_gil() -> ct.PyDLL:
    """libbpf through ctypes.PyDLL: its calls keep the GIL (see RingBuffer)."""
    lib = ct.PyDLL("libbpf.so.1", use_errno=True)
    lib.ring_buffer__consume.argtypes = [ct.c_void_p]
    return lib


def _failed(what: str) -> OSError:
    error = ct.get_errno()
    return OSError(error, f"{what}: {os.strerror(error)}")


# ---- key and value layouts: bcc's ctypes types, described in JSON and rebuilt -------------

def describe(ctype: Any) -> Any:
    """A JSON description of a ctypes type (a scalar, an array, a struct or union)."""
    if issubclass(ctype, ct.Array):
        return ["array", describe(ctype._type_), ctype._length_]
    if issubclass(ctype, ct.Structure | ct.Union):
        return ["union" if issubclass(ctype, ct.Union) else "struct", ctype.__name__,
                getattr(ctype, "_pack_", 0), list(getattr(ctype, "_anonymous_", ())),
                [[f[0], describe(f[1]), *f[2:]] for f in ctype._fields_]]
    return ctype.__name__


def rebuild(desc: Any) -> Any:
    """The ctypes type of a ``describe`` description."""
    if isinstance(desc, str):
        return getattr(ct, desc)
    if desc[0] == "array":
        return rebuild(desc[1]) * desc[2]
    kind, name, pack, anonymous, fields = desc
    namespace: dict[str, Any] = {"_anonymous_": anonymous,
                                 "_fields_": [(f[0], rebuild(f[1]), *f[2:]) for f in fields]}
    if pack:
        namespace["_pack_"] = pack
    return type(name, (ct.Union if kind == "union" else ct.Structure,), namespace)


# ---- maps and ring buffers through libbpf ----------------------------------------------------

@dataclass
class BpfMap:
    """A BPF map by file descriptor, with bcc's key and value types (``Key``, ``Leaf``; the
    ``Leaf`` of a per-CPU map is an array of one value per possible CPU)."""

    name: str
    fd: int
    max_entries: int
    Key: Any
    Leaf: Any

    def lookup(self, key: Any) -> Any:
        """The value of ``key``, or None."""
        value = self.Leaf()
        if libbpf().bpf_map_lookup_elem(self.fd, ct.byref(key), ct.byref(value)) < 0:
            if ct.get_errno() == errno.ENOENT:
                return None
            raise _failed(f"lookup in {self.name}")
        return value

    def update(self, key: Any, value: Any) -> None:
        if libbpf().bpf_map_update_elem(self.fd, ct.byref(key), ct.byref(value), 0) < 0:
            raise _failed(f"update of {self.name}")

    def take(self, key: Any) -> Any:
        """Read and delete an entry in one step (None if it is gone): nothing a program adds
        between a read and a delete is lost."""
        value = self.Leaf()
        if libbpf().bpf_map_lookup_and_delete_elem(self.fd, ct.byref(key), ct.byref(value)) < 0:
            return None
        return value

    def sum(self, key: Any) -> int:
        """The sum over CPUs of an integer value of a per-CPU map (0 if absent)."""
        values = self.lookup(key)
        return 0 if values is None else sum(values)

    def batches(self) -> Iterator[tuple[Any, Any, int]]:
        """(keys, values, count) arrays of all entries, BATCH at a time (few syscalls)."""
        token, count = ct.c_uint32(0), ct.c_uint32(0)
        first = True
        while True:
            keys, values = (self.Key * BATCH)(), (self.Leaf * BATCH)()
            count.value = BATCH
            res = libbpf().bpf_map_lookup_batch(self.fd, None if first else ct.byref(token),
                                              ct.byref(token), keys, values, ct.byref(count), None)
            error = ct.get_errno()
            if count.value:
                yield keys, values, count.value
            if res != 0:
                if error == errno.ENOENT:  # the end of the map
                    return
                raise OSError(error, f"BPF_MAP_LOOKUP_BATCH on {self.name}: "
                                     f"{os.strerror(error)}")
            first = False

    def items(self) -> Iterator[tuple[Any, Any]]:
        """All entries; integer keys as ints, structs as views of the batch arrays."""
        for keys, values, count in self.batches():
            for i in range(count):
                yield keys[i], values[i]

    def count(self) -> int:
        """The number of entries (no per-entry Python work)."""
        return sum(count for _, _, count in self.batches())


class RingBuffer:
    """libbpf's reader of a BPF ring buffer map; ``callback(ctx, data, size)`` per record.

    The wait lets go of the GIL (poll on the ring's epoll fd); the drain keeps it
    (``ring_buffer__consume`` through ``ctypes.PyDLL``). Drained by a call that lets it go, each
    record's callback would take the GIL back behind the other threads, up to the interpreter's
    switch interval (5 ms) per record: a busy Netlink thread then made the ring overflow.
    """

    def __init__(self, bpf_map: BpfMap, callback: RingCallback) -> None:
        self._callback = _RING_CB(callback)  # kept: libbpf calls it
        self._ring = libbpf().ring_buffer__new(bpf_map.fd, self._callback, None, None)
        if not self._ring:
            raise _failed(f"ring_buffer__new on {bpf_map.name}")
        self._ready = select.poll()
        self._ready.register(libbpf().ring_buffer__epoll_fd(self._ring), select.POLLIN)

    def poll(self, timeout_ms: int) -> None:
        """Wait up to ``timeout_ms`` for records, then drain them."""
        if timeout_ms:
            self._ready.poll(timeout_ms)
        self.consume()

    def consume(self) -> None:
        if _libbpf_keeping_gil().ring_buffer__consume(self._ring) < 0:
            raise _failed("ring_buffer__consume")

    def close(self) -> None:
        if self._ring:
            libbpf().ring_buffer__free(self._ring)
            self._ring = None


def cgroup_link(prog_fd: int, cgroup_fd: int, attach_type: int) -> int:
    """Attach a program to a cgroup through a bpf_link.

    Unlike BPF_PROG_ATTACH, a link goes away with its last file descriptor, so a sensor that
    dies (even by SIGKILL) leaves nothing attached; links also coexist with other programs
    on the same cgroup (another sensor, systemd) like BPF_F_ALLOW_MULTI.
    """
    fd = libbpf().bpf_link_create(prog_fd, cgroup_fd, attach_type, None)
    if fd < 0:
        raise OSError(-fd, f"bpf_link_create (attach type {attach_type}): {os.strerror(-fd)}")
    return fd


# ---- loading in a child ----------------------------------------------------------------------

@dataclass
class Program:
    """A function of the source to load as a program of ``prog_type`` (bcc's BPF.<TYPE>
    numbers, i.e. the kernel's) for ``attach_type``."""

    name: str
    prog_type: int
    attach_type: int = -1


@dataclass
class Loaded:
    """What the child loaded, now held by this process: closing it frees the maps and
    detaches the tracepoint programs (cgroup programs are attached by the caller's links)."""

    maps: dict[str, BpfMap]
    programs: dict[str, int]  # name -> program fd
    attachments: list[int] = field(default_factory=list)  # tracepoint perf event fds
    rings: list[RingBuffer] = field(default_factory=list)

    def ring(self, name: str, callback: RingCallback) -> RingBuffer:
        """A reader of the ring buffer map ``name``, closed with the rest."""
        self.rings.append(RingBuffer(self.maps[name], callback))
        return self.rings[-1]

    def close(self) -> None:
        for ring in self.rings:
            ring.close()
        self.rings.clear()
        for fd in [*self.attachments, *self.programs.values(),
                   *(m.fd for m in self.maps.values())]:
            os.close(fd)
        self.attachments.clear()
        self.programs.clear()
        self.maps.clear()


def load(source: Path, cflags: list[str], maps: tuple[str, ...],
         programs: tuple[Program, ...], timeout_s: float = 300.0) -> Loaded:
    """Compile ``source`` with bcc in a child process (``python -m sensor.bpfload``, a fixed
    command line; the request goes over the socket), where tracepoint probes attach, and take
    over its ``maps``, ``programs`` and tracepoint attachments."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours:
        with theirs:
            child = subprocess.Popen([sys.executable, "-m", "sensor.bpfload", str(theirs.fileno())],
                                     pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                     cwd=REPO)
        ours.sendall(json.dumps({"source": str(source), "cflags": cflags, "maps": maps,
                                 "programs": [vars(p) for p in programs]}).encode())
        ours.settimeout(timeout_s)
        try:
            data, fds, _flags, _ = socket.recv_fds(ours, MESSAGE_MAX, FDS_MAX)
        except TimeoutError:
            child.kill()
            raise LoadError(f"compiling {source.name} took more than {timeout_s:g} s") from None
        finally:
            child.wait(timeout_s)
    if not data:
        raise LoadError(f"the BPF loader process died (exit code {child.returncode}) before "
                        f"loading {source.name}")
    reply = json.loads(data)
    if "error" in reply:
        raise LoadError(reply["error"])
    got = {name: fds[index] for name, index in reply["fds"].items()}
    return Loaded(
        maps={name: BpfMap(name, got[f"map:{name}"], m["max_entries"], rebuild(m["key"]),
                           rebuild(m["leaf"])) for name, m in reply["maps"].items()},
        programs={p.name: got[f"prog:{p.name}"] for p in programs},
        attachments=[fd for name, fd in got.items() if name.startswith("attach:")])


def _child(sock: socket.socket, source: str, cflags: list[str], maps: list[str],
           programs: list[dict[str, Any]]) -> None:
    """In the child: compile, load, send every fd and its description, exit at once (no bcc
    cleanup: the parent's copies keep everything alive; the child's close with it)."""
    fds: dict[str, int] = {}
    try:
        with _compiler_output() as diagnostics:
            try:
                from bcc import BPF

                bpf = BPF(src_file=source.encode(), cflags=cflags)
            except Exception as error:
                raise LoadError(f"bcc could not compile {source}: {error}\n"
                                f"{diagnostics()[-DIAGNOSTICS_MAX:]}") from error
        described = {}
        for name in maps:
            table = bpf[name.encode()]
            fds[f"map:{name}"] = table.map_fd
            described[name] = {"max_entries": table.max_entries,
                               "key": describe(table.Key), "leaf": describe(table.Leaf)}
        for p in programs:
            fn = bpf.load_func(p["name"].encode(), p["prog_type"], attach_type=p["attach_type"])
            fds[f"prog:{p['name']}"] = fn.fd
        for i, fd in enumerate([*bpf.tracepoint_fds.values(), *bpf.raw_tracepoint_fds.values()]):
            fds[f"attach:{i}"] = fd
        reply: dict[str, Any] = {"maps": described, "fds": {k: i for i, k in enumerate(fds)}}
    except Exception as error:
        fds.clear()
        text = str(error) if isinstance(error, LoadError) else traceback.format_exc()
        reply = {"error": f"loading {source} failed: {text}"}
    socket.send_fds(sock, [json.dumps(reply).encode()], list(fds.values()))
    sys.stdout.flush()
    os._exit(0)


@contextlib.contextmanager
def _compiler_output() -> Iterator[Callable[[], str]]:
    """Copies what the compiler writes on stderr (fd 2) while it runs, still showing it."""
    with tempfile.TemporaryFile() as copy:
        def text() -> str:
            copy.seek(0)
            return copy.read().decode(errors="replace")

        saved = os.dup(2)
        sys.stderr.flush()
        os.dup2(copy.fileno(), 2)
        try:
            yield text
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            os.write(2, text().encode())


if __name__ == "__main__":  # the child of ``load``: argv[1] is its end of the socket pair
    with socket.socket(fileno=int(sys.argv[1])) as parent:
        _child(parent, **json.loads(parent.recv(MESSAGE_MAX)))
