"""`scan serve`: the command-line side of serving a bundle behind Triton (runtime/serving.py)."""

from __future__ import annotations

from runtime.serving import MODEL_NAME, ServeConfig, serve

from .common import say


def run_serve(config: ServeConfig) -> None:
    def ready() -> None:
        say(f"serve: model '{MODEL_NAME}' ready: HTTP localhost:{config.http_port}, gRPC localhost:{config.grpc_port}, "
            f"metrics localhost:{config.metrics_port}/metrics; {config.instances} instance(s), dynamic batches "
            f"of up to {config.max_batch_size}; Ctrl+C or SIGTERM stops it")

    serve(config, on_ready=ready)
    say("serve: stopped")
