"""Elastic Common Schema documents of a flow event (topic packetless.flows.ecs): one document per
local socket of the flow, ``source`` the initiator and ``destination`` the responder (SPEC.md).
The fields of a flow's end (its process and container) are made once per distinct end
(``shared``): a process's flows share them.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, TypeVar

import orjson

END_CACHE = 4096  # distinct processes and containers whose fields are kept (``shared``)
T = TypeVar("T")
ACTIONS = {"START": "flow_start", "UPDATE": "flow_update", "END": "flow_end"}
EVENT_TYPES = {"flow_start": ["connection", "start"], "flow_update": ["connection", "info"],
               "flow_end": ["connection", "end"], "connection_failed": ["connection", "error"]}


@lru_cache(maxsize=65536)  # the events of a flow, and of a batch, share many of their times
def iso(ns: int) -> str:
    """Epoch nanoseconds as an ISO 8601 UTC timestamp with microseconds."""
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="microseconds").replace(
        "+00:00", "Z")


def action(flow: dict[str, Any]) -> str:
    if flow["type"] == "END" and flow["end_reason"] == "failed":
        return "connection_failed"
    return ACTIONS[flow["type"]]


def drop_empty(value: Any) -> Any:
    """``value`` without None values and empty objects (ECS: fields appear when known)."""
    if type(value) is not dict:
        return value
    out = {}
    for key, item in value.items():
        if item is None:
            continue
        if type(item) is dict:
            item = drop_empty(item)
            if not item:
                continue
        out[key] = item
    return out


def process_fields(proc: dict[str, Any] | None) -> dict[str, Any] | None:
    """ECS ``process.*`` of a ``packetless.Process`` record."""
    if not proc:
        return None
    args = proc.get("args") or []
    name = proc.get("comm") or (proc.get("exe") or "").rsplit("/", 1)[-1] or None
    uid = proc.get("uid")
    return {
        "pid": proc["pid"], "name": name, "executable": proc.get("exe"),
        "args": args or None, "args_count": len(args) or None,
        "command_line": " ".join(args) or None,
        "start": iso(proc["start_time_ms"] * 1_000_000) if proc.get("start_time_ms") else None,
        "parent": {"pid": proc.get("ppid"), "name": proc.get("parent_name")},
        "user": {"id": str(uid) if uid is not None else None, "name": proc.get("user_name")},
        "group": {"id": str(proc["gid"]) if proc.get("gid") is not None else None,
                  "name": proc.get("group_name")},
        "thread": {"id": proc.get("tid")},
    }


def container_fields(ref: dict[str, Any] | None) -> dict[str, Any] | None:
    """ECS ``container.*`` of a ``packetless.ContainerRef``."""
    if not ref:
        return None
    return {"id": ref["id"], "name": ref.get("name"), "image": {"name": ref.get("image")},
            "runtime": ref.get("runtime"), "labels": ref.get("labels") or None}


def orchestrator_fields(ref: dict[str, Any] | None) -> dict[str, Any] | None:
    if not ref or not ref.get("pod_name"):
        return None
    return {"type": "kubernetes", "namespace": ref.get("pod_namespace"),
            "resource": {"type": "pod", "name": ref["pod_name"], "id": ref.get("pod_uid")}}


def documents(flow: dict[str, Any]) -> list[dict[str, Any]]:
    """The ECS documents of a ``packetless.Flow`` record, one per local end. What both documents
    have in common is built once, and they share it (read-only)."""
    sides = [side for side in ("client", "server") if flow[side]["local"]]
    if not sides:
        return []
    common = _common(flow)
    ends = {side: _end(flow[side]) for side in ("client", "server")}
    return [_document(flow, common, side, ends) for side in sides]


_SHARED: dict[tuple[str, bytes], Any] = {}


def shared(make: Callable[..., T], *parts: Any) -> T:
    """``make(*parts)``, made once per distinct ``parts`` (JSON values) and shared, read-only, by
    the documents of every flow that has them: a process's flows share its fields."""
    key = (make.__qualname__, orjson.dumps(parts))
    out = _SHARED.get(key)
    if out is None:
        if len(_SHARED) >= END_CACHE:
            _SHARED.clear()
        out = _SHARED[key] = make(*parts)
    return out


def _end(end: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ECS fields of one end of a flow (its process and container), without empty values,
    and the top-level fields of a document seen from that end."""
    return shared(_end_fields, end["process"], end["container"])


def _end_fields(process: dict[str, Any] | None, container: dict[str, Any] | None
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    out = {}
    if process:
        out["process"] = drop_empty(process_fields(process))
    if container:
        out["container"] = drop_empty(container_fields(container))
        orchestrator = orchestrator_fields(container)
        if orchestrator:
            out["orchestrator"] = drop_empty(orchestrator)
    own = {}  # ``process`` without its group, which ECS has at the top like the user
    proc = out.get("process")
    if proc is not None:
        own["process"] = {k: v for k, v in proc.items() if k != "group"}
        for key in ("user", "group"):
            if key in proc:
                own[key] = proc[key]
    for key in ("container", "orchestrator"):
        if key in out:
            own[key] = out[key]
    return out, own


def _common(flow: dict[str, Any]) -> dict[str, Any]:
    """The fields that do not depend on the side a document is seen from (only ``event.end``
    and ``event.reason`` may be unknown)."""
    client, server = flow["client"], flow["server"]
    act = action(flow)
    start_ns, end_ns = flow["start_ns"], flow["end_ns"]
    last_ns = end_ns or max(flow["timestamp_ms"] * 1_000_000, start_ns)
    event = {"kind": "event", "category": ["network"], "type": EVENT_TYPES[act], "action": act,
             "outcome": "failure" if act == "connection_failed" else "success",
             "dataset": "packetless.flows", "module": "packetless", "start": iso(start_ns),
             "duration": max(last_ns - start_ns, 0),
             "created": iso(flow["emitted_ms"] * 1_000_000)}
    if end_ns:
        event["end"] = iso(end_ns)
    if flow["error"] is not None:
        event["reason"] = flow["error"]
    return {
        "@timestamp": iso(flow["timestamp_ms"] * 1_000_000),
        "ecs": {"version": "8.11.0"},
        "event": event,
        "network": {
            "transport": flow["transport"], "type": flow["family"],
            "iana_number": str(flow["iana_number"]), "community_id": flow["community_id"],
            "bytes": flow["client_bytes"] + flow["server_bytes"],
            "packets": flow["client_packets"] + flow["server_packets"],
        },
        "source": {"ip": client["ip"], "port": client["port"], "bytes": flow["client_bytes"],
                   "packets": flow["client_packets"]},
        "destination": {"ip": server["ip"], "port": server["port"], "bytes": flow["server_bytes"],
                        "packets": flow["server_packets"]},
        "host": {"name": flow["host_name"]},
        "related": {"ip": sorted({client["ip"], server["ip"]})},
    }


def _document(flow: dict[str, Any], common: dict[str, Any], side: str,
              ends: dict[str, tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """The ECS document of ``flow`` seen from its local ``side`` (client or server)."""
    me = flow[side]
    peer_side = "server" if side == "client" else "client"
    peer, mine, theirs = flow[peer_side], ends[side][1], ends[peer_side][0]
    doc = dict(common)
    doc["event"] = {**common["event"],
                    "id": f"{flow['flow_id']}-{flow['sequence']}-{me['socket_cookie']}"}
    doc["network"] = {**common["network"], "direction": "egress" if side == "client" else "ingress"}
    doc.update(mine)
    ours = {"flow_id": flow["flow_id"], "flow_event": flow["type"], "sequence": flow["sequence"],
            "end_reason": flow["end_reason"], "socket_cookie": me["socket_cookie"],
            "netns_inode": me["netns_inode"]}
    if flow["transport"] == "tcp":
        ours["tcp"] = {"rtt_us": me["srtt_us"], "rtt_var_us": me["rttvar_us"],
                       "retransmits": me["retransmits"], "state": me["tcp_state"]}
    ours = drop_empty(ours)
    if peer["local"]:  # its fields are without empty values already
        ours["peer"] = {k: v for k, v in (("process", theirs.get("process")),
                                          ("container", theirs.get("container")),
                                          ("socket_cookie", peer["socket_cookie"]))
                        if v is not None}
    doc["packetless"] = ours
    return doc
