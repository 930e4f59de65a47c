"""Your own flow, composing a keruta task with ordinary Prefect tasks and using its result.

    python examples/compose.py            # runs on the local backend against a temporary Prefect server

`keruta_task` is an ordinary Prefect flow: called from a flow it becomes a child flow run and returns a
`TaskResult` (status, attempt, exit code, duration, log line count and the artifacts manifest). When
the keruta task fails it raises `KerutaTaskFailed`, whose `.result` holds the same record.
"""

from typing import Any

from prefect import flow, task

from keruta_prefect import KerutaTaskFailed, TaskResult, keruta_task


@task
def build_spec(topic: str) -> dict[str, Any]:
    return {
        "title": f"report on {topic}",
        "additionalEnv": {"TOPIC": topic},
        "script": 'echo "writing about $TOPIC"\n'
                  'mkdir -p "$KERUTA_ARTIFACTS_DIR" && echo "# $TOPIC" > "$KERUTA_ARTIFACTS_DIR/report.md"',
    }


@task
def summarize(result: TaskResult) -> str:
    files = ", ".join(f"{a.path} ({a.size} bytes, sha256 {a.sha256[:12]})" for a in result.artifacts)
    return f"{result.task_id}: {result.status} after {result.duration_seconds or 0:.1f}s; files: {files or 'none'}"


@flow(name="nightly-report")
def nightly_report(topic: str = "keruta", backend: str = "local") -> str:
    spec = build_spec(topic)
    try:
        result = keruta_task(task_spec=spec, backend=backend)  # a child flow run of this one
    except KerutaTaskFailed as failure:
        return f"the report failed: {failure.result.reason}: {failure.result.message}"
    return summarize(result)


if __name__ == "__main__":
    print(nightly_report())
