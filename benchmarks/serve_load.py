"""Load on `scan serve`: throughput and latency at several concurrencies, against local calls, in one run.

    python -m benchmarks.serve_load --bundle demo_out/bundle --vocab sky,grass,... --requests 48 \
        --concurrency 1,4,16 --out benchmarks/results/serve_tiny

Starts a real Triton server with `scan serve`, sends a fixed number of requests per concurrency
level (one HTTP client per worker thread), compares every label map with the local `Segmenter`'s
on the same image (a wrong or lost answer is counted, never dropped), reads the server's memory
(its whole process tree) before and after each level and Triton's batch statistics, and stops
the server. The local baseline runs the same images one after another in this process.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from runtime.segmenter import Segmenter
from runtime.serving import MODEL_NAME, free_ports
from runtime.synthetic import synthetic_scene
from runtime.vocab import parse_vocabulary

from .machine import machine, versions
from .stats import summarise

ROOT = Path(__file__).resolve().parents[1]


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants (the Python server, tritonserver, backend stubs)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
        stack.extend(children.get(current, []))
    return total


def _request(client, module, image: np.ndarray, names: np.ndarray) -> np.ndarray:
    inputs = [module.InferInput("image", [1, *image.shape], "UINT8"), module.InferInput("classes", list(names.shape), "BYTES")]
    inputs[0].set_data_from_numpy(image[None])
    inputs[1].set_data_from_numpy(names)
    return client.infer(MODEL_NAME, inputs).as_numpy("labels")[0]


def run_level(url: str, images, expected, names, concurrency: int, requests: int) -> dict:
    import tritonclient.http as module

    latencies, wrong, errors = [], [], []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        client = module.InferenceServerClient(url, network_timeout=600, connection_timeout=600)
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            image_index = index % len(images)
            start = time.perf_counter()
            try:
                labels = _request(client, module, images[image_index], names)
            except Exception as exc:  # counted and reported, the run goes on
                with lock:
                    errors.append(str(exc).splitlines()[0])
                continue
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)
                if not np.array_equal(labels, expected[image_index]):
                    wrong.append(index)

    begin = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - begin
    return {"concurrency": concurrency, "requests": requests, "answered": len(latencies), "wrong": len(wrong),
            "errors": len(errors), "error_examples": errors[:3], "wall_s": round(wall, 3),
            "throughput_per_s": round(len(latencies) / wall, 3), "latency_s": summarise(latencies)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--vocab", required=True)
    parser.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--images", type=int, default=8, help="distinct synthetic images, cycled")
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (server and local)")
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--repository", action="store_true",
                        help="serve a model repository of the bundle (scan triton-repo --backend python: BLS "
                             "orchestrator and piece models) instead of the bundle itself")
    parser.add_argument("--out", type=Path, required=True, help="results path without suffix (.json and .md)")
    args = parser.parse_args(argv)
    height, width = (int(v) for v in args.size.lower().split("x"))
    names = parse_vocabulary(args.vocab)
    images = [synthetic_scene(height, width, seed=s) for s in range(args.images)]

    local = Segmenter(args.bundle, threads=args.threads)
    local.set_vocabulary(names)
    local.segment(images[0])  # warm-up
    expected, local_times = [], []
    for image in images:
        start = time.perf_counter()
        expected.append(local.segment(image).label_map.astype(np.int32))
        local_times.append(time.perf_counter() - start)
    del local

    http, grpc, metrics = free_ports(3)
    ports = ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--exit-timeout", "10"]
    workspace = tempfile.TemporaryDirectory(prefix="scan_serve_load_")
    if args.repository:
        from export.triton_repo import RepositoryOptions, write_repository

        repository = write_repository(args.bundle, Path(workspace.name) / "repository", RepositoryOptions(
            piece_backend="python", vocab=",".join(names), instances=args.instances,
            max_batch_size=args.max_batch_size, threads=args.threads or 0), report=lambda line: None)
        command = [sys.executable, "-m", "cli", "serve", "--repository", str(repository), *ports]
    else:
        command = [sys.executable, "-m", "cli", "serve", "--bundle", str(args.bundle), "--vocab", ",".join(names),
                   "--instances", str(args.instances), "--max-batch-size", str(args.max_batch_size), *ports]
        if args.threads:
            command += ["--threads", str(args.threads)]
    log = Path(workspace.name) / "server.log"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with workspace, open(log, "w") as handle:
        server = subprocess.Popen(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
        try:
            import tritonclient.http as module

            client = module.InferenceServerClient(f"localhost:{http}")
            deadline = time.time() + 300
            while time.time() < deadline:
                try:
                    if client.is_model_ready(MODEL_NAME):
                        break
                except Exception:
                    pass
                if server.poll() is not None:
                    raise RuntimeError(f"the server exited: {log.read_text()[-3000:]}")
                time.sleep(0.5)
            raw_names = np.array([[n.encode("utf-8") for n in names]], dtype=np.object_)
            _request(client, module, images[0], raw_names)  # warm-up
            levels = []
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                before = tree_rss(server.pid)
                level = run_level(f"localhost:{http}", images, expected, raw_names, concurrency, args.requests)
                level["server_rss_bytes"] = {"before": before, "after": tree_rss(server.pid)}
                levels.append(level)
                print(f"concurrency {concurrency}: {level['throughput_per_s']:.2f} req/s, p50 "
                      f"{level['latency_s']['p50']:.3f} s, wrong {level['wrong']}, errors {level['errors']}",
                      file=sys.stderr)
            stats = client.get_inference_statistics(MODEL_NAME)["model_stats"][0]["batch_stats"]
            client.close()  # Triton waits for open connections when it stops
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)
    result = {
        "machine": machine(), "versions": versions(), "bundle": str(args.bundle), "image_size": [height, width],
        "classes": len(names), "threads": args.threads, "instances": args.instances,
        "max_batch_size": args.max_batch_size,
        "server": "scan serve --repository (BLS orchestrator, Python-backend pieces)" if args.repository else "scan serve --bundle",
        "local": {"latency_s": summarise(local_times), "throughput_per_s": round(len(local_times) / sum(local_times), 3)},
        "levels": levels,
        "batches": {str(entry["batch_size"]): int(entry["compute_infer"]["count"]) for entry in stats},
        "server_exit_status": server.returncode,
    }
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    local = result["local"]
    rows = [f"| local `Segmenter`, one process | 1 | {local['latency_s']['runs']} | {local['throughput_per_s']:.2f} | "
            f"{local['latency_s']['p50']:.3f} | {local['latency_s']['p99']:.3f} | 0 | 0 | - |"]
    for level in result["levels"]:
        rss = level["server_rss_bytes"]
        rows.append(f"| `{result['server'].split(' (')[0]}` (Triton, HTTP) | {level['concurrency']} | {level['requests']} | "
                    f"{level['throughput_per_s']:.2f} | {level['latency_s']['p50']:.3f} | {level['latency_s']['p99']:.3f} | "
                    f"{level['wrong']} | {level['errors']} | {rss['before'] / 2**20:.0f} -> {rss['after'] / 2**20:.0f} |")
    head = ("| | concurrency | requests | throughput (req/s) | p50 (s) | p99 (s) | wrong | errors | server RSS (MiB) |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    size = "x".join(str(v) for v in result["image_size"])
    return (f"{size} synthetic images, {result['classes']} classes, {result['instances']} instance(s), dynamic batches "
            f"up to {result['max_batch_size']}; Triton's batches (size: count): {result['batches']}\n\n"
            + head + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
