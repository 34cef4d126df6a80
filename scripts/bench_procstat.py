"""CPU accounting for `make bench`, read straight from /proc (Linux): where did the cores go?

`CpuMeter.snapshot()` records, for named process trees (a service, the postmaster and its
backends, nats-server...), user+system CPU seconds including reaped children, plus the whole
machine's busy and total time from /proc/stat. `CpuMeter.delta(before, after)` turns two
snapshots into seconds per component, the machine's busy share, and "other": busy time of
processes that are not ours (other work on the machine, which makes figures noisy).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

_TICK = float(os.sysconf("SC_CLK_TCK"))


@dataclass(frozen=True)
class _Proc:
    ppid: int
    own_s: float
    reaped_children_s: float


def _read_proc(pid: int) -> _Proc | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = text[text.rfind(")") + 2 :].split()
    return _Proc(
        ppid=int(rest[1]),
        own_s=(int(rest[11]) + int(rest[12])) / _TICK,
        reaped_children_s=(int(rest[13]) + int(rest[14])) / _TICK,
    )


def _all_procs() -> dict[int, _Proc]:
    procs: dict[int, _Proc] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            proc = _read_proc(int(entry.name))
            if proc is not None:
                procs[int(entry.name)] = proc
    return procs


def _machine() -> tuple[float, float]:
    """(busy seconds, total seconds) summed over all CPUs since boot."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
    total = sum(values)
    idle = values[3] + values[4]
    return (total - idle) / _TICK, total / _TICK


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds per component tree, and the machine's counters."""

    components: dict[str, float]
    machine_busy_s: float
    machine_total_s: float


@dataclass
class CpuMeter:
    """Snapshots CPU use of named process trees (root pids given per component)."""

    roots: dict[str, int] = field(default_factory=dict)
    own_only: set[str] = field(default_factory=set)
    """Components counted without descendants (the bench process, parent of everything)."""

    def snapshot(self) -> CpuSnapshot:
        """Current counters; a tree's time includes its live descendants and reaped children."""
        procs = _all_procs()
        children: dict[int, list[int]] = {}
        for pid, proc in procs.items():
            children.setdefault(proc.ppid, []).append(pid)
        components: dict[str, float] = {}
        for name, root in self.roots.items():
            if root not in procs:
                continue  # not running (any more): no figure rather than a wrong one
            total = 0.0
            stack = [root]
            seen: set[int] = set()
            while stack:
                pid = stack.pop()
                if pid in seen or pid not in procs:
                    continue
                seen.add(pid)
                if name in self.own_only:
                    total += procs[pid].own_s
                    break
                total += procs[pid].own_s + procs[pid].reaped_children_s
                stack.extend(children.get(pid, ()))
            components[name] = total
        busy, total_s = _machine()
        return CpuSnapshot(components, busy, total_s)

    @staticmethod
    def delta(before: CpuSnapshot, after: CpuSnapshot, wall_s: float) -> dict[str, object]:
        """CPU seconds per component between two snapshots, as core-shares of `wall_s`."""
        used: dict[str, float] = {
            name: round(after.components[name] - value, 3)
            for name, value in before.components.items()
            if name in after.components
        }
        busy = after.machine_busy_s - before.machine_busy_s
        total = after.machine_total_s - before.machine_total_s
        ours = sum(used.values())
        return {
            "cpu_s": used,
            "cores_used": {name: round(v / wall_s, 2) for name, v in used.items()}
            if wall_s
            else {},
            "machine_busy_share": round(busy / total, 3) if total else None,
            "other_processes_cpu_s": round(max(busy - ours, 0.0), 3),
            "wall_s": round(wall_s, 3),
        }


def format_delta(delta: Mapping[str, object]) -> str:
    """One human line: cores used per component."""
    cores = delta.get("cores_used")
    parts = [f"{k}={v}" for k, v in cores.items()] if isinstance(cores, dict) else []
    return (
        f"cores used: {' '.join(parts)} other={delta.get('other_processes_cpu_s')}s "
        f"machine busy={delta.get('machine_busy_share')}"
    )
