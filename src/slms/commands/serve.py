"""`slms serve`: a model behind an OpenAI-compatible HTTP API, with a browser playground."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from slms.commands import options

HELP = "serve a model over an OpenAI-compatible HTTP API, with a browser playground"
LOCAL = {"127.0.0.1", "localhost", "::1"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_checkpoint(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0: any free port")
    p.add_argument("--max-batch", type=int, default=16,
                   help="requests decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting beyond those; more get 503 (default 64)")
    p.add_argument("--api-key", default=os.environ.get("SLMS_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $SLMS_API_KEY)")
    p.add_argument("--name", help="the model name clients send (default: the directory's name)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the model (default on a CPU: all cores but one, which "
                   "is left to the HTTP side; docs/benchmarks.md)")
    options.add_device(p)
    options.add_precision(p)


def load_with_threads(args: argparse.Namespace, threads: int | None):
    """The model, loaded with the threads that will serve it (precision=auto measures bf16
    while it loads); a model that fails to load leaves the thread count as it was."""
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return options.load_model(args)
    except BaseException:
        torch.set_num_threads(previous)
        raise


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0 .. 65535; got {args.port}")
    from slms.serve.scheduler import check_capacity

    check_capacity(args.max_batch, args.max_queue)  # before the model loads
    try:
        import uvicorn

        from slms.serve.app import create_app
    except ImportError as e:
        raise ValueError(f"slms serve needs the serve extra ({e.name} is missing): "
                         "pip install 'slms[serve]'") from None
    threads = args.threads
    if threads is None and args.device == "cpu":
        # Idle torch threads spin, and on a small CPU they starve the event loop that streams
        # the tokens: on 2 cores, 1 thread served the tiny model 1.5-2.5x faster than 2.
        threads = max(1, (os.cpu_count() or 2) - 1)
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1; got {threads}")
    model, tok = load_with_threads(args, threads)
    name = args.name or Path(args.checkpoint).resolve().name
    sock = listen(args.host, args.port)
    app = create_app(model, tok, name, args.max_batch, args.max_queue, args.api_key)
    host, port = sock.getsockname()[:2]
    if args.host not in LOCAL:
        print(f"warning: listening on {args.host}: anyone who can reach this machine can use "
              "the model" + ("" if args.api_key else "; pass --api-key to require a key"),
              file=sys.stderr)
    where = f"http://{'localhost' if args.host in LOCAL else host}:{port}"
    print(f"slms serve: {name} at {where}/v1 (playground: {where}/), batch {args.max_batch}; "
          "Ctrl-C stops", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0


def listen(host: str, port: int) -> socket.socket:
    """A bound socket for the server (a clear line when the address cannot be used)."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(2048)  # clients queue from now on, before the server's loop accepts
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}; is another "
                         "server using it? pick another --port") from None
    return sock
