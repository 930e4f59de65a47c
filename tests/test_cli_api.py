"""`keruta-prefect api` as a user starts it: its own process, loopback by default, token required."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from keruta_harness.processes import free_port

from tests.waiting import eventually


def test_api_command_serves_the_contract_on_loopback_with_the_env_token(keruta_home: Path) -> None:
    port = free_port()
    env = {**os.environ, "KERUTA_API_TOKEN": "tok-123"}
    proc = subprocess.Popen([sys.executable, "-m", "keruta_prefect.cli", "api", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def healthy() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"`keruta-prefect api` exited {proc.returncode}: {proc.stderr.read()}")  # at once
            try:
                return httpx.get(f"http://127.0.0.1:{port}/api/v1/health").status_code == 200
            except httpx.TransportError:
                return False  # not listening yet

        eventually(healthy, what="`keruta-prefect api` to answer on /api/v1/health")
        headers = {"Authorization": "Bearer tok-123"}
        created = httpx.post(f"http://127.0.0.1:{port}/api/v1/tasks", json={"id": "via-cli"}, headers=headers)
        assert created.status_code == 201
        assert httpx.get(f"http://127.0.0.1:{port}/api/v1/tasks/via-cli").status_code == 401
        assert listening_addresses(port) == {"127.0.0.1"}
    finally:
        proc.terminate()
        proc.wait(10)


def listening_addresses(port: int) -> set[str]:
    """IPv4 addresses with a socket listening on ``port`` (from /proc/net/tcp; state 0A = LISTEN)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found
