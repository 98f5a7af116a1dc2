"""`scan triton-repo` and `scan export --triton`: a bundle as a Triton model repository (export/triton_repo.py);
`scan serve --repository`: such a repository on PyTriton's server binary (runtime/serving.py)."""

from __future__ import annotations

import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from runtime.errors import ScanError

from .common import say


def parse_gpus(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        gpus = tuple(int(v) for v in text.split(","))
    except ValueError:
        gpus = ()
    if not gpus or any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise ScanError(f"--gpus {text!r}: give distinct device numbers, comma-separated (e.g. 0 or 0,1)")
    return gpus


def run_triton_repo(bundle: Path, out: Path, options) -> Path:
    from export.triton_repo import write_repository

    path = write_repository(bundle, out, options, report=say)
    say(f"serve it with a stock Triton server: tritonserver --model-repository {path} (see README, Serving); "
        f"model 'scan' takes 'image' or 'image_bytes' and optional 'classes'")
    return path


def run_serve_repository(repository: Path, http_port: int, grpc_port: int, metrics_port: int, exit_timeout: int) -> None:
    """Run PyTriton's tritonserver on `repository` in the foreground until SIGINT/SIGTERM."""
    from runtime.serving import repository_server

    with tempfile.TemporaryDirectory(prefix="scan-triton-") as workspace:
        command, environ = repository_server(repository, Path(workspace), http_port, grpc_port, metrics_port)
        command.append(f"--exit-timeout-secs={exit_timeout}")
        process = subprocess.Popen(command, env=environ)
        stopping = []

        def stop(signum, frame) -> None:
            stopping.append(signum)
            process.send_signal(signal.SIGINT)  # Triton drains connections and requests on SIGINT

        previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            _announce_when_ready(process, http_port, grpc_port, metrics_port)
            code = process.wait()
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
            if process.poll() is None:
                process.kill()
        if stopping and code != 0:
            say(f"serve: Triton's exit timeout ({exit_timeout} s) ran out before open connections and in-flight "
                "requests finished; it stopped them (raise --exit-timeout to wait longer)")
        elif code not in (0, -signal.SIGINT):
            raise ScanError(f"the Triton server stopped with status {code}: its log above says why "
                            "(a model that failed to load is listed as UNAVAILABLE)")
        say("serve: stopped")


def _announce_when_ready(process: subprocess.Popen, http_port: int, grpc_port: int, metrics_port: int) -> None:
    url = f"http://localhost:{http_port}/v2/health/ready"
    while process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    say(f"serve: repository ready: HTTP localhost:{http_port}, gRPC localhost:{grpc_port}, "
                        f"metrics localhost:{metrics_port}/metrics; Ctrl+C or SIGTERM stops it")
                    return
        except OSError:
            pass
        time.sleep(0.5)
