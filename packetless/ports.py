"""Whether a local TCP port is free to listen on, and which process holds it when it is not:
the stack, the broker and the stream worker check their ports with it before they start, so
that a taken port is named rather than found in a traceback."""

from __future__ import annotations

import socket

import psutil


def port_free(host: str, port: int) -> bool:
    """True when a server could bind host:port now (SO_REUSEADDR, as the JVM does)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_taken_message(port: int) -> str:
    """'port N is taken by another process', naming that process when it can be seen."""
    owners = {
        conn.pid
        for conn in psutil.net_connections(kind="inet")
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid
    }
    names = []
    for pid in sorted(owners):
        try:
            names.append(f"{psutil.Process(pid).name()} pid {pid}")
        except psutil.Error:
            names.append(f"pid {pid}")
    who = f" ({', '.join(names)})" if names else ""
    return f"port {port} is taken by another process{who}"
