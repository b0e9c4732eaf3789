"""OCSF Network Activity (class_uid 4001) events of a flow event (topic packetless.flows.ocsf),
one per local socket like the ECS documents; ``src_endpoint`` is the initiator. The objects of a
process or container are made once per distinct one (``ecs.shared``).
"""

from __future__ import annotations

from typing import Any

from streams.ecs import drop_empty, shared

OCSF_VERSION = "1.3.0"
ACTIVITY = {"open": (1, "Open"), "close": (2, "Close"), "fail": (4, "Fail"),
            "refuse": (5, "Refuse"), "traffic": (6, "Traffic")}


def _activity(flow: dict[str, Any]) -> tuple[int, str]:
    if flow["type"] == "START":
        return ACTIVITY["open"]
    if flow["type"] == "UPDATE":
        return ACTIVITY["traffic"]
    if flow["end_reason"] == "failed":
        return ACTIVITY["refuse" if flow["error"] == "ECONNREFUSED" else "fail"]
    return ACTIVITY["close"]


def _process(proc: dict[str, Any]) -> dict[str, Any]:
    exe = proc.get("exe")
    return drop_empty({
        "pid": proc["pid"], "name": proc.get("comm"),
        "cmd_line": " ".join(proc.get("args") or []) or None,
        "file": {"path": exe, "name": exe.rsplit("/", 1)[-1]} if exe else None,
        "user": {"uid": str(proc["uid"]) if proc.get("uid") is not None else None,
                 "name": proc.get("user_name")},
        "parent_process": {"pid": proc.get("ppid"), "name": proc.get("parent_name")}
        if proc.get("ppid") is not None else None,
        "created_time": proc.get("start_time_ms")})


def _container(ref: dict[str, Any]) -> dict[str, Any]:
    return drop_empty({"uid": ref["id"], "name": ref.get("name"), "image": {"name": ref.get("image")}
            if ref.get("image") else None, "runtime": ref.get("runtime"),
            "labels": [f"{k}={v}" for k, v in sorted((ref.get("labels") or {}).items())] or None,
            "orchestrator": "kubernetes" if ref.get("pod_name") else None,
            "pod_uuid": ref.get("pod_uid")})


def _endpoint(end: dict[str, Any], host: str) -> dict[str, Any]:
    out = {"ip": end["ip"], "port": end["port"]}
    if end["local"]:
        out["hostname"] = host
    if end["container"]:
        out["container"] = shared(_container, end["container"])
    return out


def events(flow: dict[str, Any]) -> list[dict[str, Any]]:
    """The OCSF events of a ``packetless.Flow`` record, one per local end. What both events have
    in common is built once (only the error and the end time may be unknown there), and they
    share it (read-only)."""
    sides = [side for side in ("client", "server") if flow[side]["local"]]
    if not sides:
        return []
    activity_id, activity_name = _activity(flow)
    failed = flow["end_reason"] == "failed"
    start_ms = flow["start_ns"] // 1_000_000
    end_ms = flow["end_ns"] // 1_000_000 if flow["end_ns"] else None
    host = flow["host_name"]
    common = {
        "class_uid": 4001, "class_name": "Network Activity",
        "category_uid": 4, "category_name": "Network Activity",
        "activity_id": activity_id, "activity_name": activity_name,
        "type_uid": 4001 * 100 + activity_id, "type_name": f"Network Activity: {activity_name}",
        "severity_id": 1, "severity": "Informational",
        "status_id": 2 if failed else 1, "status": "Failure" if failed else "Success",
        "time": flow["timestamp_ms"], "start_time": start_ms,
        "duration": (end_ms or flow["timestamp_ms"]) - start_ms,
        "metadata": {"version": OCSF_VERSION, "correlation_uid": flow["flow_id"],
                     "product": {"name": "Packetless", "vendor_name": "Packetless"},
                     "logged_time": flow["emitted_ms"]},
        "src_endpoint": _endpoint(flow["client"], host),
        "dst_endpoint": _endpoint(flow["server"], host),
        "connection_info": {"protocol_num": flow["iana_number"], "protocol_name": flow["transport"],
                            "protocol_ver_id": 6 if flow["family"] == "ipv6" else 4,
                            "community_uid": flow["community_id"], "uid": flow["flow_id"]},
        "traffic": {"bytes_out": flow["client_bytes"], "bytes_in": flow["server_bytes"],
                    "packets_out": flow["client_packets"], "packets_in": flow["server_packets"],
                    "bytes": flow["client_bytes"] + flow["server_bytes"],
                    "packets": flow["client_packets"] + flow["server_packets"]},
    }
    if flow["error"] is not None:
        common["status_detail"] = flow["error"]
    if end_ms is not None:
        common["end_time"] = end_ms
    return [event(flow, common, side) for side in sides]


def event(flow: dict[str, Any], common: dict[str, Any], side: str) -> dict[str, Any]:
    """The OCSF Network Activity event of ``flow`` seen from its local ``side``, completing the
    fields ``common`` to both sides."""
    me = flow[side]
    outbound = side == "client"
    doc = dict(common)
    doc["metadata"] = {**common["metadata"],
                       "uid": f"{flow['flow_id']}-{flow['sequence']}-{me['socket_cookie']}"}
    doc["connection_info"] = {**common["connection_info"],
                              "direction": "Outbound" if outbound else "Inbound",
                              "direction_id": 2 if outbound else 1}
    if me["process"]:
        doc["actor"] = {"process": shared(_process, me["process"])}
    device = {"hostname": flow["host_name"], "type_id": 0, "type": "Unknown"}
    container = common["src_endpoint" if outbound else "dst_endpoint"].get("container")
    if container:
        device["container"] = container
    doc["device"] = device
    doc["unmapped"] = {"packetless": drop_empty({
        "socket_cookie": me["socket_cookie"], "rtt_us": me["srtt_us"], "rtt_var_us": me["rttvar_us"],
        "retransmits": me["retransmits"], "tcp_state": me["tcp_state"],
        "end_reason": flow["end_reason"]})}
    return doc
