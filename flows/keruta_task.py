"""Entrypoint of the `keruta-task` deployment (see prefect.yaml). The flow lives in keruta_prefect."""

from keruta_prefect.flows import keruta_task

__all__ = ["keruta_task"]

if __name__ == "__main__":
    import sys

    from keruta_prefect.cli import main

    raise SystemExit(main(["run", "--task-file", *sys.argv[1:2]] if sys.argv[1:] else ["run", "--help"]))
