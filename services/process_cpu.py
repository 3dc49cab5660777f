"""CPU seconds of this machine's processes, by role, from ``/proc`` (Linux): each Serve
deployment of one application (its pools and coordinator), Serve's proxy and controller,
Ray's own processes, the caller, and the rest. ``serve bench`` prints them per request.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

PROC = Path("/proc")
RAY_PACKAGE = f"{os.sep}ray{os.sep}"  # Ray's daemons run from its package: gcs_server, raylet, python -u .../log_monitor.py


def role_of(cmdline: str, app: str) -> str:
    """The role of a process by its command line: a deployment of ``app`` (its name), ``proxy``,
    ``serve_controller``, ``ray`` (Ray's daemons, idle workers and other actors) or ``other``.
    Ray titles a replica ``ray::ServeReplica:<app>:<deployment>``, and an actor running a
    method ``ray::<class>.<method>``."""
    if cmdline.startswith("ray::"):
        name = cmdline[len("ray::"):].split(" ", 1)[0]
        if name.startswith("ServeReplica:"):
            parts = name.split(":", 2)
            return parts[2].split(".", 1)[0] if len(parts) == 3 and parts[1] == app else "other"
        if name.startswith("ProxyActor"):
            return "proxy"
        if name.startswith("ServeController"):
            return "serve_controller"
        return "ray"
    program = cmdline.split(" ", 3)[:3]  # the executable, or python, its flags and the script
    return "ray" if any(RAY_PACKAGE in word for word in program) else "other"


def _stat_fields(stat: str) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (which may hold spaces), so
    field N of proc(5) is item N - 3."""
    return stat[stat.rindex(")") + 2:].split()


def _cpu_seconds(stat: str, ticks_per_s: int) -> float:
    """User plus system CPU seconds from the text of ``/proc/<pid>/stat`` (fields 14 and 15)."""
    fields = _stat_fields(stat)
    return (int(fields[11]) + int(fields[12])) / ticks_per_s


def inherit_roles(roles: Mapping[int, str], parents: Mapping[int, int]) -> dict[int, str]:
    """``roles`` where each ``other`` process takes the role of its nearest ancestor that has
    one: a replica's children (a vLLM pool's engine core and its workers) count for its pool."""
    out = dict(roles)
    for pid, role in roles.items():
        seen, parent = {pid}, parents.get(pid)
        while role == "other" and parent in roles and parent not in seen:
            seen.add(parent)
            role, parent = roles[parent], parents.get(parent)
        out[pid] = role
    return out


def process_cpu(app: str) -> dict[int, tuple[str, float]]:
    """Every readable process: pid -> (role, CPU seconds so far); this process is ``bench``, and
    a process of no role of its own takes its parent's (``inherit_roles``). Empty where there
    is no ``/proc``."""
    ticks, me = os.sysconf("SC_CLK_TCK"), os.getpid()
    roles: dict[int, str] = {}
    parents: dict[int, int] = {}
    seconds: dict[int, float] = {}
    try:
        entries = [e for e in os.listdir(PROC) if e.isdigit()]
    except OSError:
        return {}
    for entry in entries:
        try:
            stat = (PROC / entry / "stat").read_text()
            cmdline = (PROC / entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # it ended meanwhile, or is not ours to read
            continue
        pid = int(entry)
        roles[pid] = "bench" if pid == me else role_of(cmdline, app)
        parents[pid], seconds[pid] = int(_stat_fields(stat)[1]), _cpu_seconds(stat, ticks)
    return {pid: (role, seconds[pid]) for pid, role in inherit_roles(roles, parents).items()}


def cpu_by_role(before: Mapping[int, tuple[str, float]], after: Mapping[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds each role spent between two ``process_cpu`` snapshots (a process that began
    in between counts from zero; one that ended is lost)."""
    spent: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        delta = seconds - before.get(pid, (role, 0.0))[1]
        if delta > 0:
            spent[role] = spent.get(role, 0.0) + delta
    return spent
