"""The benchmark's figures, and RESULTS.md rendered from them (pure: no measuring, no files).

Every number RESULTS.md shows is one entry of a flat mapping, which the same run writes as
benchmarks/results.json, so that runs can be compared key by key. KEYS (the last section of RESULTS.md)
documents the keys; their last words name the unit. The *_figures functions turn what a measurement
returned into figures; render() turns figures (and the few words a run adds: notes) into markdown.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from benchmarks.artifacts import Artifacts

Figures = Mapping[str, float]  # int or float; JSON numbers

UNITS = ("Units are the last words of a key: `_ms` milliseconds, `_s` seconds, `_mib` MiB (2^20 bytes), "
         "`_mib_per_s` MiB per second, `_per_s` per second, `_ms_per_task` milliseconds per task; "
         "`_vs_<other>` is a ratio (the key's subject ÷ `<other>`, same measure: for throughput keruta's MiB/s "
         "÷ the other's, so above 1 keruta is faster; for latency the named system's p50 ÷ keruta's); keys "
         "without a unit word count things (runs, tasks, requests, watches, lines, files), `logs_in_order` is "
         "1 (yes) or 0. A key that names no system is keruta-prefect's.")

KEYS: tuple[tuple[str, str], ...] = (
    ("completion_runs", "runs per system (section 1)"),
    ("completion_p50_ms, completion_p95_ms", "keruta-prefect: terminal status written → wait() returned"),
    ("completion_{system}_p50_ms, _p95_ms, _p50_vs_keruta",
     "the same for {system} = prefect_kubernetes, bare_watch (the bare official-client watch)"),
    ("api_requests_{system}_{N}s_task", "requests the API server received for one task whose Pod runs N s "
                                        "({system} = keruta, prefect_kubernetes)"),
    ("api_requests_{system}_{N}s_task_{verb}_{resource}", "of which with this verb on this resource "
                                                          "(`pods_exec` is pods/exec)"),
    ("concurrent_tasks, concurrent_pod_run_s", "tasks at once in one process, and how long each Pod runs"),
    ("concurrent_peak_watches, _requests, _requests_per_s, _wall_s",
     "keruta-prefect; `concurrent_prefect_kubernetes_…` the same for prefect-kubernetes"),
    ("overhead_runs", "runs of each flow (section 4)"),
    ("overhead_start_ms, overhead_start_empty_flow_ms, overhead_start_above_empty_flow_ms",
     "flow start → Job create received; the empty flow's start → body; the difference"),
    ("overhead_end_ms, overhead_end_empty_flow_ms, overhead_end_above_empty_flow_ms",
     "final report → files collected over exec and the run recorded; the empty flow's body end → return; "
     "the difference"),
    ("overhead_exec_mode_ms", "both differences together: what the keruta-task flow adds to an empty flow "
                              "in the default settings (artifacts mode exec)"),
    ("overhead_report_to_return_ms", "final report → flow returned"),
    ("agent_import_ms, agent_cpu_ms_per_true_task, agent_wall_ms_per_true_task, python_bare_cpu_ms",
     "the agent's imports (CPU), one agent process running `true` (CPU, wall), `python -c pass` (CPU)"),
    ("fanout_tasks, fanout_concurrency, fanout_completed", "section 5's sizes and the tasks that completed"),
    ("fanout_wall_s, fanout_agent_median_ms, fanout_overhead_ms_per_task", "wall time, median agent run, "
                                                                           "overhead per task"),
    ("fanout_cpu_flows_ms_per_task, fanout_cpu_agent_ms_per_task, fanout_cpu_server_ms_per_task, fanout_peak_rss_mib",
     "CPU per task of this process, of the agents, of the Prefect server and its database; peak RSS of this "
     "process"),
    ("floor_runs, floor_{run}_client_cpu_ms, floor_{run}_server_cpu_ms", "Prefect's own cost: CPU of this process "
     "and of the Prefect server (with its database) per empty {run} (flow_run: a child flow run; task_run)"),
    ("scale_tasks, scale_completed, scale_completed_share, scale_peak_watches, scale_wall_s",
     "section 8: tasks at once, completed (and the share), watches at the peak, wall time"),
    ("scale_requests, scale_watch_requests, scale_requests_per_task, scale_requests_per_task_amortised",
     "requests in all, the shared watch's, per task without them, per task with them"),
    ("scale_requests_{verb}_{resource}", "requests by verb and resource (`pods_log` is pods/log)"),
    ("scale_peak_rss_mib, scale_threads, scale_sockets, scale_peak_sockets",
     "this process at the peak (the harness runs in it too): RSS, threads, open sockets"),
    ("scale_list_{scope}_bytes, scale_list_{scope}_s", "one LIST of the Pods: {scope} = namespaced (keruta's "
                                                       "label selector) or cluster (all Pods)"),
    ("scale_pipeline_{…}", "keruta-pipeline at scale: tasks, concurrency, completed, completed_share, wall_s, "
                           "peak_watches, requests, requests_per_task, peak_rss_mib, threads, sockets"),
    ("artifacts_{case}_file_mib, artifacts_{case}_files", "the case: one file of this many MiB ({case} = e.g. "
                                                          "1gib), or this many files of 1 KiB ({case} = small)"),
    ("artifacts_{case}_keruta_s, _keruta_mib_per_s, _rss_growth_mib", "keruta's collection over exec"),
    ("artifacts_small_per_file_us", "(keruta's time − `tar \\| cat`'s) ÷ files: what keruta adds per file"),
    ("artifacts_{case}_tar_s, _tar_mib_per_s, _vs_tar", "`tar cf - \\| cat` of the same files; keruta ÷ it"),
    ("artifacts_{case}_kubectl_cp_s, _kubectl_cp_mib_per_s, _vs_kubectl_cp",
     "`kubectl cp` of the same files from the same container; keruta ÷ it"),
    ("logs_lines, logs_stored, logs_in_order, logs_agent_run_s, logs_lines_per_s", "section 7"),
)

COMPLETION_SYSTEMS = (("prefect-kubernetes", "prefect_kubernetes"), ("bare official-client watch", "bare_watch"))
REQUEST_SYSTEMS = (("keruta-prefect", "keruta"), ("prefect-kubernetes", "prefect_kubernetes"))


def _round(value: float, digits: int = 3) -> float:
    return round(float(value), digits)


def ms(value_ms: float) -> str:
    return f"{value_ms:.1f} ms" if value_ms < 10_000 else f"{value_ms / 1000:.1f} s"


def rate(mib_per_s: float) -> str:
    return f"{mib_per_s:.0f} MiB/s" if mib_per_s >= 10 else f"{mib_per_s:.1f} MiB/s"


# --- measurements → figures ---------------------------------------------------------------------------

def completion_figures(detection: Mapping[str, Mapping[str, float]], runs: int) -> dict[str, float]:
    k = detection["keruta-prefect"]
    figures: dict[str, float] = {"completion_runs": runs, "completion_p50_ms": _round(k["p50"] * 1000),
                                 "completion_p95_ms": _round(k["p95"] * 1000)}
    for name, key in COMPLETION_SYSTEMS:
        other = detection[name]
        figures |= {f"completion_{key}_p50_ms": _round(other["p50"] * 1000),
                    f"completion_{key}_p95_ms": _round(other["p95"] * 1000),
                    f"completion_{key}_p50_vs_keruta": _round(other["p50"] / k["p50"])}
    return figures


def request_figures(counts: Mapping[str, Mapping[int, Counter[str]]]) -> dict[str, float]:
    figures: dict[str, float] = {}
    for name, key in REQUEST_SYSTEMS:
        for seconds, by_kind in sorted(counts[name].items()):
            prefix = f"api_requests_{key}_{seconds}s_task"
            figures[prefix] = sum(by_kind.values())
            for kind, n in sorted(by_kind.items()):
                figures[f"{prefix}_{kind.replace(' ', '_').replace('/', '_')}"] = n
    return figures


def concurrent_figures(measured: Mapping[str, Mapping[str, float]], tasks: int, pod_run_s: float) -> dict[str, float]:
    figures: dict[str, float] = {"concurrent_tasks": tasks, "concurrent_pod_run_s": pod_run_s}
    for name, key in REQUEST_SYSTEMS:
        v = measured[name]
        prefix = "concurrent_" if key == "keruta" else f"concurrent_{key}_"
        figures |= {f"{prefix}peak_watches": int(v["peak_watches"]), f"{prefix}requests": int(v["requests"]),
                    f"{prefix}requests_per_s": _round(v["requests_per_s"]), f"{prefix}wall_s": _round(v["wall"])}
    return figures


def overhead_figures(oh: Mapping[str, float]) -> dict[str, float]:
    start_extra = oh["to_create"] - oh["empty_start"]
    end_extra = oh["to_record"] - oh["empty_end"]
    return {"overhead_runs": int(oh["runs"]),
            "overhead_start_ms": _round(oh["to_create"] * 1000),
            "overhead_start_empty_flow_ms": _round(oh["empty_start"] * 1000),
            "overhead_start_above_empty_flow_ms": _round(start_extra * 1000),
            "overhead_end_ms": _round(oh["to_record"] * 1000),
            "overhead_end_empty_flow_ms": _round(oh["empty_end"] * 1000),
            "overhead_end_above_empty_flow_ms": _round(end_extra * 1000),
            "overhead_exec_mode_ms": _round((start_extra + end_extra) * 1000),
            "overhead_report_to_return_ms": _round(oh["to_return"] * 1000)}


def fanout_figures(fan: Mapping[str, Any]) -> dict[str, float]:
    return {"fanout_tasks": int(fan["tasks"]), "fanout_concurrency": int(fan["concurrency"]),
            "fanout_completed": int(fan["completed"]), "fanout_wall_s": _round(fan["wall"]),
            "fanout_agent_median_ms": _round(fan["agent_median"] * 1000),
            "fanout_overhead_ms_per_task": _round(fan["overhead_per_task"] * 1000),
            "fanout_cpu_flows_ms_per_task": _round(fan["cpu_flow_per_task"] * 1000),
            "fanout_cpu_agent_ms_per_task": _round(fan["cpu_agent_per_task"] * 1000),
            "fanout_cpu_server_ms_per_task": _round(fan["cpu_server_per_task"] * 1000),
            "fanout_peak_rss_mib": _round(fan["peak_rss"] / 2**20, 1)}


def agent_figures(cold: Mapping[str, float]) -> dict[str, float]:
    return {key: _round(value, 1) for key, value in cold.items()}


def render_agent(f: Figures, notes: Mapping[str, str]) -> list[str]:
    return ["## 5a. The agent's cold start", "",
            "What every task's agent costs before and around its script, medians: the CPU of importing the agent "
            "(its entry module and the HTTP stack it loads; `python -X importtime -m keruta_prefect.agent` shows "
            "the same), and the CPU of one whole agent process running a `true` task, launched by the local backend "
            "against the embedded keruta API, against the same interpreter doing nothing. Budget: imports ≤ 150 ms "
            "(the agent loads neither Prefect, pydantic, httpx nor rich; a test holds it to that).", "",
            "| imports | one agent run of `true` (CPU) | its wall time | `python -c pass` (CPU) |",
            "|---|---|---|---|",
            f"| {ms(f['agent_import_ms'])} | {ms(f['agent_cpu_ms_per_true_task'])} | "
            f"{ms(f['agent_wall_ms_per_true_task'])} | {ms(f['python_bare_cpu_ms'])} |"]


MIB_PER_MB = 10**6 / 2**20
# The targets of the performance issue and the earlier ones: (figure, what, at most / at least, the target, unit).
TARGETS: tuple[tuple[str, str, str, float, str], ...] = (
    ("completion_p50_ms", "completion detection p50", "≤", 20, "ms"),
    ("completion_p95_ms", "completion detection p95", "≤", 50, "ms"),
    ("api_requests_keruta_60s_task", "Kubernetes API requests for one 60 s task", "≤", 6, ""),
    ("concurrent_peak_watches", "watches for 50 tasks at once", "≤", 1, ""),
    ("overhead_exec_mode_ms", "keruta-task flow above an empty flow", "≤", 100, "ms"),
    ("agent_import_ms", "agent imports (CPU)", "≤", 150, "ms"),
    ("fanout_overhead_ms_per_task", "fan-out overhead per task", "≤", 150, "ms"),
    ("fanout_peak_rss_mib", "fan-out peak RSS", "≤", 500 * MIB_PER_MB, "MiB"),
    ("artifacts_1gib_vs_kubectl_cp", "1 GiB: keruta ÷ kubectl cp", "≥", 1.5, "×"),
    ("artifacts_1gib_vs_tar", "1 GiB: keruta ÷ `tar \\| cat`", "≥", 0.5, "×"),
    ("artifacts_1gib_rss_growth_mib", "1 GiB: RSS growth", "≤", 100 * MIB_PER_MB, "MiB"),
    ("artifacts_small_vs_kubectl_cp", "10,000 files: keruta ÷ kubectl cp", "≥", 1.5, "×"),
    ("artifacts_small_per_file_us", "10,000 files: per-file overhead", "≤", 40, "µs"),
    ("scale_completed_share", "1,000 tasks at once: the share that completed", "≥", 1, ""),
    ("scale_peak_watches", "1,000 tasks at once: watches", "≤", 1, ""),
    ("scale_requests_per_task", "1,000 tasks at once: API requests per task", "≤", 4, ""),
    ("scale_peak_rss_mib", "1,000 tasks at once: peak RSS", "≤", 1000 * MIB_PER_MB, "MiB"),
    ("scale_pipeline_completed_share", "keruta-pipeline, 200 at concurrency 100: the share that completed", "≥", 1,
     ""),
    ("scale_pipeline_peak_watches", "keruta-pipeline, 200 at concurrency 100: watches", "≤", 1, ""),
    ("scale_pipeline_requests_per_task", "keruta-pipeline, 200 at concurrency 100: API requests per task", "≤", 4,
     ""),
    ("scale_pipeline_peak_rss_mib", "keruta-pipeline, 200 at concurrency 100: peak RSS", "≤", 1000 * MIB_PER_MB,
     "MiB"),
)


# What bounds a target when it is missed (said under the table for the missed ones).
BOUNDS: dict[str, str] = {
    "overhead_exec_mode_ms": "Prefect's own start of a flow run and its task runs (section 5 measures an empty child "
                             "flow run and an empty task run), and the two exec round trips of the collection.",
    "fanout_overhead_ms_per_task": "The Prefect server: section 5's CPU split puts more CPU per keruta task in the "
                                   "Prefect server (and its PostgreSQL) than in this process and the agent together, "
                                   "all on the same 2 cores; an empty child flow run with six empty task runs "
                                   "already costs more than 150 ms per task on 2 cores (section 5, what bounds it).",
    "artifacts_1gib_vs_kubectl_cp": "The emulator's exec endpoint (Python, in its own process): keruta and kubectl "
                                    "cp both receive as fast as it sends, so they come out level.",
    "artifacts_1gib_vs_tar": "The same emulator between the files and the collector; `tar | cat` has none.",
    "artifacts_small_vs_kubectl_cp": "keruta's per-entry work in Python (tarfile's header parsing and data filter, "
                                     "open/write/close, a sha256 and a row per file) against Go's tar in kubectl.",
    "artifacts_small_per_file_us": "The same per-entry work: about 200 µs a file in Python on this machine.",
    "scale_completed_share": "The harness: its emulator runs in the same process (one event loop, the GIL shared "
                             "with two thousand task threads on 2 cores), Pods start minutes late, and the "
                             "benchmark gives each task 300 s; those that ran out count as not completed.",
    "scale_requests_per_task": "Log reads (`get pods/log`) and Job reads while no Pod exists yet (10 s, 20, 40, then "
                               "every 60 s) on the swamped emulator; at 200 at once it is exactly 4 (create job, "
                               "one log read, two execs). Why the log followers read again there is not found yet.",
}


def _met(value: float, sense: str, target: float) -> bool:
    return value <= target if sense == "≤" else value >= target


def render_targets(f: Figures, notes: Mapping[str, str]) -> list[str]:
    """Every target next to what this run measured; a missed one says so (its section says what bounds it)."""
    rows = []
    families = {"_".join(key.split("_")[:2]) for key in f}  # e.g. artifacts_1gib, scale_pipeline, fanout_cpu
    for key, what, sense, target, unit in TARGETS:
        if key not in f:
            if "_".join(key.split("_")[:2]) in families:  # its case ran, the figure is missing (kubectl failed)
                rows.append(f"| {what} | {sense} {target:.4g} {unit}".rstrip() + f" | not measured | **missed** | "
                            f"`{key}` |")
            continue
        value = f[key]
        met = _met(value, sense, target)
        shown = f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        rows.append(f"| {what} | {sense} {target:.4g} {unit}".rstrip() + f" | {shown} {unit}".rstrip()
                    + f" | {'met' if met else '**missed**'} | `{key}` |")
    missed = [key for key, _what, sense, target, _unit in TARGETS if key in f and key in BOUNDS
              and not _met(f[key], sense, target)]
    bounds = ["", "What bounds each missed one:", "", *[f"- `{key}`: {BOUNDS[key]}" for key in missed]]
    return ["## Targets", "", "| what | target | measured | | figure |", "|---|---|---|---|---|", *rows,
            *(bounds if missed else [])]


def scale_figures(scale: Mapping[str, float]) -> dict[str, float]:
    figures = {key: _round(value, 2) for key, value in scale.items()}
    for prefix in ("scale_", "scale_pipeline_"):
        if f"{prefix}tasks" in figures:
            figures[f"{prefix}completed_share"] = _round(figures[f"{prefix}completed"] / figures[f"{prefix}tasks"])
    return figures


def render_scale(f: Figures, notes: Mapping[str, str]) -> list[str]:
    by_verb = sorted(((key.removeprefix("scale_requests_"), f[key]) for key in f
                      if key.startswith("scale_requests_") and key[len("scale_requests_"):].split("_")[0]
                      in ("get", "list", "watch", "create", "delete", "patch")), key=lambda kv: -kv[1])
    lines = ["## 8. 1,000 tasks at once", "",
             f"{f['scale_tasks']:.0f} tasks at once from one process through the Kubernetes backend (a thread per "
             "task: launch, wait, collect over exec), each Pod running 5 s on the manual kubelet, the harness in the "
             "same process; and keruta-pipeline with "
             f"{f['scale_pipeline_tasks']:.0f} tasks at concurrency {f['scale_pipeline_concurrency']:.0f} on the "
             "harness with its real kubelet (agents are processes), Prefect on PostgreSQL. Requests per task leave "
             "out the shared watch's LIST and WATCH (counted apart). Targets: all complete, 1 watch, ≤ 4 requests "
             "per task, peak RSS ≤ 1 GB.", "",
             "| run | completed | watches at the peak | requests per task (+ the watch's) | wall | peak RSS | threads "
             "| sockets |", "|---|---|---|---|---|---|---|---|",
             f"| {f['scale_tasks']:.0f} at once | {f['scale_completed']:.0f} | {f['scale_peak_watches']:.0f} | "
             f"{f['scale_requests_per_task']:.2f} (+{f['scale_watch_requests']:.0f}) | {f['scale_wall_s']:.0f} s | "
             f"{f['scale_peak_rss_mib']:.0f} MiB | {f['scale_threads']:.0f} | {f['scale_sockets']:.0f} "
             f"(peak {f['scale_peak_sockets']:.0f}) |",
             f"| keruta-pipeline {f['scale_pipeline_tasks']:.0f} at {f['scale_pipeline_concurrency']:.0f} | "
             f"{f['scale_pipeline_completed']:.0f} | {f['scale_pipeline_peak_watches']:.0f} | "
             f"{f['scale_pipeline_requests_per_task']:.2f} (of {f['scale_pipeline_requests']:.0f} in all) | "
             f"{f['scale_pipeline_wall_s']:.0f} s | {f['scale_pipeline_peak_rss_mib']:.0f} MiB | "
             f"{f['scale_pipeline_threads']:.0f} | {f['scale_pipeline_sockets']:.0f} |", "",
             f"Requests of the {f['scale_tasks']:.0f} at once, by verb: "
             + ", ".join(f"{verb.replace('_', ' ', 1).replace('_', '/')} {count:.0f}" for verb, count in by_verb)
             + f" (of {f['scale_requests']:.0f}: {f['scale_requests_per_task_amortised']:.2f} a task, the watch's "
             "included)."]
    if "scale_list_namespaced_bytes" in f:
        lines += ["", "One LIST of the Pods with every task's Pod in place: keruta's (one namespace, keruta's label "
                  f"selector) {f['scale_list_namespaced_bytes'] / 1e6:.2f} MB in {f['scale_list_namespaced_s']:.2f} s; "
                  f"cluster-wide (`/api/v1/pods`, what Prefect's observer lists, PrefectHQ/prefect #22208) "
                  f"{f['scale_list_cluster_bytes'] / 1e6:.2f} MB in {f['scale_list_cluster_s']:.2f} s — the same "
                  "here, where the harness holds only these Pods; on a shared cluster the cluster-wide LIST grows "
                  "with every Pod of every team. keruta lists once per watch start (and after a 410), not per "
                  "task."]
    return lines


def floor_figures(floor: Mapping[str, float]) -> dict[str, float]:
    return {"floor_runs": int(floor["runs"]),
            **{f"floor_{run}_{side}_cpu_ms": _round(floor[f"{run}_{side}"] * 1000)
               for run in ("flow_run", "task_run") for side in ("client", "server")}}


def artifacts_figures(measured: Artifacts) -> dict[str, float]:
    figures: dict[str, float] = {}
    for case in measured.cases:
        prefix = f"artifacts_{case.label}"
        mib = case.size / 2**20
        if case.label == "small":
            figures[f"{prefix}_files"] = case.size // 1024
            # what keruta adds to each file beyond reading the archive (tar | cat): extract, hash, write, publish
            figures[f"{prefix}_per_file_us"] = _round((case.keruta_s - case.tar_s) / (case.size // 1024) * 1e6, 1)
        else:
            figures[f"{prefix}_file_mib"] = case.size // 2**20
        figures |= {f"{prefix}_keruta_s": _round(case.keruta_s),
                    f"{prefix}_keruta_mib_per_s": _round(mib / case.keruta_s, 2),
                    f"{prefix}_rss_growth_mib": _round(case.rss_growth / 2**20, 1),
                    f"{prefix}_tar_s": _round(case.tar_s), f"{prefix}_tar_mib_per_s": _round(mib / case.tar_s, 2),
                    f"{prefix}_vs_tar": _round(case.tar_s / case.keruta_s)}
        if case.kubectl_s is not None:
            figures |= {f"{prefix}_kubectl_cp_s": _round(case.kubectl_s),
                        f"{prefix}_kubectl_cp_mib_per_s": _round(mib / case.kubectl_s, 2),
                        f"{prefix}_vs_kubectl_cp": _round(case.kubectl_s / case.keruta_s)}
    return figures


def artifacts_notes(measured: Artifacts) -> dict[str, str]:
    return {"kubectl_version": measured.kubectl_version, "kubectl_failures": "\n".join(measured.kubectl_notes)}


def log_figures(logs: Mapping[str, Any]) -> dict[str, float]:
    return {"logs_lines": int(logs["lines"]), "logs_stored": int(logs["stored"]),
            "logs_in_order": 1 if logs["in_order"] else 0, "logs_agent_run_s": _round(logs["agent_seconds"]),
            "logs_lines_per_s": _round(logs["lines_per_s"], 1)}


# --- figures → markdown ---------------------------------------------------------------------------------

def render_completion(f: Figures, notes: Mapping[str, str]) -> list[str]:
    return ["## 1. Completion detection", "",
            f"From the write of the terminal status to the return of the waiting code, {f['completion_runs']:.0f} "
            "runs each. keruta-prefect in the default settings (artifacts mode exec): the agent reports, then holds "
            "its files; measured to the return of `wait()` (the outcome; the collection follows). "
            "prefect-kubernetes: `KubernetesJob.trigger().wait_for_completion()` (5 s interval), with the "
            "completion written at a uniformly random moment of its poll cycle. Target: keruta p50 ≤ 20 ms, "
            "p95 ≤ 50 ms.", "",
            "| system | p50 | p95 | p50 as a multiple of keruta's |", "|---|---|---|---|",
            f"| keruta-prefect | {ms(f['completion_p50_ms'])} | {ms(f['completion_p95_ms'])} | 1× |",
            f"| prefect-kubernetes | {ms(f['completion_prefect_kubernetes_p50_ms'])} | "
            f"{ms(f['completion_prefect_kubernetes_p95_ms'])} | "
            f"{f['completion_prefect_kubernetes_p50_vs_keruta']:.0f}× |",
            f"| bare official-client watch | {ms(f['completion_bare_watch_p50_ms'])} | "
            f"{ms(f['completion_bare_watch_p95_ms'])} | {f['completion_bare_watch_p50_vs_keruta']:.2f}× "
            "(the practical limit) |"]


def render_requests(f: Figures, notes: Mapping[str, str]) -> list[str]:
    durations = sorted({int(m[1]) for key in f if (m := re.fullmatch(r"api_requests_keruta_(\d+)s_task", key))})
    lines = ["## 2. Kubernetes API requests per task", "",
             "Requests the API server received for one task whose Pod runs for the given time (each system "
             "on its own emulator); keruta's include the collection of its files over exec (`create pods/exec` "
             "×2: tar, then the release). Target: keruta ≤ 6 and independent of duration.", "",
             "| system | " + " | ".join(f"{d} s task" for d in durations) + " | requests |",
             "|---|" + "---|" * len(durations) + "---|"]
    for name, key in REQUEST_SYSTEMS:
        totals = [f"{f[f'api_requests_{key}_{d}s_task']:.0f}" for d in durations]
        details = []
        for d in durations:
            prefix = f"api_requests_{key}_{d}s_task_"
            kinds = sorted((_kind(k[len(prefix):]), k) for k in f if k.startswith(prefix))
            details.append(f"{d} s: " + ", ".join(f"{kind} ×{f[k]:.0f}" for kind, k in kinds))
        lines.append(f"| {name} | " + " | ".join(totals) + f" | {'; '.join(details)} |")
    return lines


def _kind(key: str) -> str:
    """`create_pods_exec` → `create pods/exec` (verbs and resource names have no underscore)."""
    verb, *resource = key.split("_")
    return f"{verb} {'/'.join(resource)}"


def render_concurrent(f: Figures, notes: Mapping[str, str]) -> list[str]:
    lines = [f"## 3. {f['concurrent_tasks']:.0f} tasks at once in one process", "",
             f"Each task's Pod runs {f['concurrent_pod_run_s']:g} s; keruta collects each task's files over exec. "
             "Target: 1 watch per namespace.", "",
             "| system | watch connections at the peak | requests | requests/s | wall |", "|---|---|---|---|---|"]
    for name, key in REQUEST_SYSTEMS:
        p = "concurrent_" if key == "keruta" else f"concurrent_{key}_"
        lines.append(f"| {name} | {f[p + 'peak_watches']:.0f} | {f[p + 'requests']:.0f} | "
                     f"{f[p + 'requests_per_s']:.1f} | {f[p + 'wall_s']:.1f} s |")
    return lines


def render_overhead(f: Figures, notes: Mapping[str, str]) -> list[str]:
    return ["## 4. Orchestration overhead", "",
            "The keruta-task flow on the Kubernetes backend in the default settings (artifacts mode exec), medians "
            f"of {f['overhead_runs']:.0f} runs, against an empty Prefect flow in the same server and process, the "
            "two taking turns. After the agent's final report: the outcome, the collection of its files over exec "
            "(tar, release), the run recorded. Target: ≤ 100 ms above the empty flow.", "",
            "| step | keruta-task | empty flow | above it |", "|---|---|---|---|",
            f"| flow start → Job create received (empty: → flow body) | {ms(f['overhead_start_ms'])} | "
            f"{ms(f['overhead_start_empty_flow_ms'])} | {ms(f['overhead_start_above_empty_flow_ms'])} |",
            "| final report → files collected, run recorded (empty: body end → return) | "
            f"{ms(f['overhead_end_ms'])} | {ms(f['overhead_end_empty_flow_ms'])} | "
            f"{ms(f['overhead_end_above_empty_flow_ms'])} |",
            f"| both steps | | | {ms(f['overhead_exec_mode_ms'])} |",
            f"| final report → flow returned (summary, artifacts, event) | {ms(f['overhead_report_to_return_ms'])} "
            "| | |"]


def render_fanout(f: Figures, notes: Mapping[str, str]) -> list[str]:
    lines = ["## 5. Fan-out through keruta-pipeline", "",
             f"{f['fanout_tasks']:.0f} tasks (`true`) on the local backend, {f['fanout_concurrency']:.0f} at a "
             "time, each a child flow run under a global concurrency limit. Overhead per task = (wall − ⌈tasks / "
             "concurrency⌉ × the median agent run) / tasks. CPU per task: this process (Prefect client, flows, "
             "embedded keruta API), the agent processes, and the Prefect server with its PostgreSQL, all on the "
             "same 2 cores. Targets: ≤ 150 ms/task overhead, ≤ 500 MB RSS.", "",
             "| tasks | completed | wall | median agent run | overhead per task | CPU per task: flows / agent / "
             "Prefect server | peak RSS |", "|---|---|---|---|---|---|---|",
             f"| {f['fanout_tasks']:.0f} | {f['fanout_completed']:.0f} | {f['fanout_wall_s']:.1f} s | "
             f"{ms(f['fanout_agent_median_ms'])} | {ms(f['fanout_overhead_ms_per_task'])} | "
             f"{ms(f['fanout_cpu_flows_ms_per_task'])} / {ms(f['fanout_cpu_agent_ms_per_task'])} / "
             f"{ms(f.get('fanout_cpu_server_ms_per_task', 0))} | {f['fanout_peak_rss_mib']:.0f} MiB |"]
    if "floor_runs" in f:
        flow_run = f["floor_flow_run_client_cpu_ms"] + f["floor_flow_run_server_cpu_ms"]
        task_run = f["floor_task_run_client_cpu_ms"] + f["floor_task_run_server_cpu_ms"]
        floor = flow_run + 6 * task_run
        lines += ["", "What bounds it: Prefect's own cost, measured in the same run with empty runs "
                  f"({f['floor_runs']:.0f} each, one after another in a parent flow):", "",
                  "| empty … | CPU here (client) | CPU of the Prefect server and PostgreSQL |", "|---|---|---|",
                  f"| child flow run | {ms(f['floor_flow_run_client_cpu_ms'])} | "
                  f"{ms(f['floor_flow_run_server_cpu_ms'])} |",
                  f"| task run | {ms(f['floor_task_run_client_cpu_ms'])} | {ms(f['floor_task_run_server_cpu_ms'])} |",
                  "", f"A keruta task is one child flow run and six task runs (the pipeline's run-keruta-task, "
                  "prepare-task, launch-agent, wait-for-agent, collect-artifacts, record-run): "
                  f"{ms(floor)} of CPU before keruta does anything, so at least {ms(floor / 2)} per task on 2 "
                  "cores however the work is spread."]
    return lines


def render_artifacts(f: Figures, notes: Mapping[str, str] | None = None) -> list[str]:
    notes = notes or {}
    lines = ["## 6. Artifact collection", "",
             "Over exec (tar on a real WebSocket, streamed into the safe extractor: data filter, caps, sha256, "
             "staged writes) against `tar cf - | cat` of the same files, and against `kubectl cp POD:DIR ./local "
             "-c main` of the same files from the same holding container on the same harness (what users reach "
             "for without keruta-prefect). Each copy is checked against the source (paths, sizes, sha256) before "
             "its time counts. The harness (API server and exec endpoint) runs in a process of its own; its exec "
             "endpoint sends stdout in WebSocket messages of up to 1 MiB (a real kubelet's are smaller: this favours "
             "keruta and kubectl cp alike). Targets: "
             "one large file ≥ 1.5× `kubectl cp` and ≥ 0.5× `tar | cat`; many small files ≥ 1.5× `kubectl cp` and "
             "≤ 40 µs per file above `tar | cat`; RSS growth ≤ 100 MB. prefect-kubernetes has no artifact "
             f"collection. kubectl: {notes.get('kubectl_version', '?')}.", "",
             "| case | copy | throughput | time | keruta's throughput ÷ its | peak RSS growth |",
             "|---|---|---|---|---|---|"]
    labels = [m[1] for key in f if (m := re.fullmatch(r"artifacts_(\w+?)_keruta_s", key))]
    for label in labels:
        p = f"artifacts_{label}_"
        title = (f"one file of {f[p + 'file_mib']:.0f} MiB" if p + "file_mib" in f
                 else f"{f[p + 'files']:.0f} files of 1 KiB")
        lines += [f"| {title} | keruta (exec) | {rate(f[p + 'keruta_mib_per_s'])} | {f[p + 'keruta_s']:.2f} s | | "
                  f"{f[p + 'rss_growth_mib']:.1f} MiB |",
                  f"| | tar \\| cat | {rate(f[p + 'tar_mib_per_s'])} | {f[p + 'tar_s']:.2f} s | "
                  f"{f[p + 'vs_tar']:.2f}× | |"]
        if p + "kubectl_cp_s" in f:
            lines.append(f"| | kubectl cp | {rate(f[p + 'kubectl_cp_mib_per_s'])} | {f[p + 'kubectl_cp_s']:.2f} s | "
                         f"{f[p + 'vs_kubectl_cp']:.2f}× | |")
        else:
            lines.append("| | kubectl cp | failed (below) | | | |")
        if p + "per_file_us" in f:
            lines.append(f"| | keruta − tar \\| cat, per file | | {f[p + 'per_file_us']:.0f} µs | | |")
    failures = [line for line in notes.get("kubectl_failures", "").splitlines() if line]
    if failures:
        lines += ["", "kubectl cp against this harness:", "", *[f"- {line}" for line in failures]]
    return lines


def render_logs(f: Figures, notes: Mapping[str, str]) -> list[str]:
    return ["## 7. Log streaming", "",
            "A chatty agent (`seq 1 N`) on the local backend: every line through the keruta API into the "
            "database, exactly once and in order. prefect-kubernetes reads Pod logs only when the Job ends "
            "and does not store them.", "",
            "| lines | stored | in order | agent run | lines/s |", "|---|---|---|---|---|",
            f"| {f['logs_lines']:.0f} | {f['logs_stored']:.0f} | {'yes' if f['logs_in_order'] else 'NO'} | "
            f"{f['logs_agent_run_s']:.2f} s | {f['logs_lines_per_s']:.0f} |"]


def render_keys() -> list[str]:
    return ["## results.json", "",
            "The same run writes every figure above to `benchmarks/results.json`, one flat JSON object, so that "
            f"runs can be compared key by key. {UNITS}", "",
            "| keys | what |", "|---|---|", *[f"| `{keys}` | {what} |" for keys, what in KEYS]]


Section = Callable[[Figures, Mapping[str, str]], list[str]]
# Each section with the key that says it was measured, in the order of the run.
SECTIONS: tuple[tuple[str, Section], ...] = (
    ("completion_runs", render_completion), ("api_requests_keruta_", render_requests),
    ("concurrent_tasks", render_concurrent), ("overhead_runs", render_overhead), ("agent_import_ms", render_agent),
    ("fanout_tasks", render_fanout),
    ("artifacts_", render_artifacts), ("logs_lines", render_logs), ("scale_pipeline_tasks", render_scale))


def measured(figures: Figures, marker: str) -> bool:
    return any(key.startswith(marker) for key in figures) if marker.endswith("_") else marker in figures


def render(figures: Figures, notes: Mapping[str, str]) -> str:
    """The sections measured so far, then what results.json holds."""
    lines: list[str] = [*render_targets(figures, notes), ""]
    for marker, section in SECTIONS:
        if measured(figures, marker):
            lines += [*section(figures, notes), ""]
    return "\n".join([*lines, *render_keys()]) + "\n"
