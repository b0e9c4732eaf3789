"""``packetless top``: a live terminal table of containers and pods from the stream worker's
web views (``/containers``, ``/pods``): flows as client/server, bytes, RTT, retransmissions."""

from __future__ import annotations

import time
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

COLUMNS = ("name", "image / namespace", "flows c/s", "bytes in", "bytes out", "failed",
           "retrans", "RTT client avg/p95", "RTT server avg/p95")


def _size(n: int | None) -> str:
    value = float(n or 0)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return ""


def _rtt(stats: dict[str, Any] | None) -> str:
    if not stats or not stats.get("samples"):
        return "-"
    return f"{stats['mean_us'] / 1000:.2f}/{stats['p95_us'] / 1000:.2f} ms"


def table(title: str, entities: list[dict[str, Any]]) -> Table:
    """One rich table of entities as the web views return them."""
    t = Table(title=title, expand=True)
    t.add_column(COLUMNS[0], no_wrap=True)
    for col in COLUMNS[1:]:
        t.add_column(col, overflow="fold")
    for e in entities:
        w = e["window"]
        t.add_row(e.get("name") or e["id"][:12],
                  e.get("image") or e.get("namespace") or "",
                  f"{w['flows_as_client']}/{w['flows_as_server']}",
                  _size(w["bytes_in"]), _size(w["bytes_out"]), str(w["failed_connects"]),
                  str(w["retransmits"]), _rtt(w.get("rtt_as_client")), _rtt(w.get("rtt_as_server")))
    return t


def render(web_url: str, client: httpx.Client) -> Group:
    """The screen: containers and pods tables, or what went wrong reaching the worker."""
    try:
        containers = client.get(f"{web_url}/containers").json()["containers"]
        pods = client.get(f"{web_url}/pods").json()["pods"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        return Group(Text(f"cannot read {web_url}: {exc}", style="red"),
                     Text("is the stream worker running? (packetless up / packetless streams)"))
    stamp = Text(time.strftime("%H:%M:%S") + f"  {web_url}  (Ctrl-C to quit)", style="dim")
    return Group(stamp, table("Containers", containers), table("Pods", pods))


def main(web_url: str, refresh: float) -> int:
    """Refresh the table every ``refresh`` seconds until Ctrl-C."""
    console = Console()
    with httpx.Client(timeout=5) as client, Live(render(web_url, client), console=console,
                                                  screen=False, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(refresh)
                live.update(render(web_url, client), refresh=True)
        except KeyboardInterrupt:
            return 0
