"""`make lab` opens the lessons in JupyterLab, with the project's interpreter as the kernel.

The test runs the target itself (on a free port, no browser), asks the server's REST API what it serves, and
stops it; then it starts the kernel a lesson would get and asks which Python it is.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "minijamba-test"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port, path):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"token {TOKEN}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status, response.read()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_lab_serves_the_lessons():
    port = free_port()
    args = f"--no-browser --ip=127.0.0.1 --port={port} --IdentityProvider.token={TOKEN}"
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    server = subprocess.Popen(
        ["make", "-s", "lab", f"LAB_ARGS={args}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline, listing = time.monotonic() + 90, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                status, body = get(port, "/api/contents")
                listing = {item["name"] for item in json.loads(body)["content"]}
                break
            except OSError:
                time.sleep(0.5)
        assert listing is not None, f"JupyterLab did not answer: {server.stdout.read().decode()[-2000:]}"
        lessons = {p.name for p in (ROOT / "lessons").glob("[0-9][0-9]_*.ipynb")}
        assert lessons <= listing, f"the server's root is not lessons/: {sorted(listing)}"
        status, _ = get(port, "/lab")
        assert status == 200
        status, body = get(port, "/api/kernelspecs")
        assert json.loads(body)["default"] == "python3"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_lesson_kernel_is_the_project_interpreter():
    from jupyter_client.manager import start_new_kernel

    manager, client = start_new_kernel(kernel_name="python3")
    try:
        reply = []
        client.execute_interactive(
            "import sys, minijamba; print(sys.prefix); print(minijamba.__file__)",
            output_hook=lambda msg: reply.append(msg["content"].get("text", "")),
            timeout=60,
        )
    finally:
        manager.shutdown_kernel(now=True)
    prefix, package = "".join(reply).split()
    assert Path(prefix) == Path(sys.prefix), "the kernel runs another Python environment than the project's"
    assert Path(package).resolve() == ROOT / "minijamba" / "__init__.py"
