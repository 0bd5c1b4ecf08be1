"""``cfcd serve``: the search service and web page over an index (and a benchmark).

Examples::

    cfcd serve out/index --images photos/
    cfcd serve demo/index --gnd demo/benchmark/gnd_demo.pkl           # + the benchmark view
    cfcd serve idx_new --gnd gnd_roxford5k.pkl --compare idx_old       # the model against its baseline
    cfcd serve gldv2/index --dataset gldv2_retrieval --root data       # a registered benchmark (GLDv2)

The model, preprocessing, scales and crop rule are read from the index's source-store meta, so a
query is described exactly as the database was (at most ``--max-query-size`` on the long side
when the database was extracted at full resolution). The port is bound before the model loads.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", type=Path, help="index directory from 'cfcd index build' (or a descriptor store)")
    parser.add_argument("--images", type=Path, default=None,
                        help="root of the database images (default: where the store's images were read from)")
    m = parser.add_argument_group("model (default: the one recorded in the index's meta)")
    m.add_argument("--model", default=None, help="registry name; refused when it is not the index's model")
    m.add_argument("--weights", default=None, help="weights file of --model (checked against the index's meta)")
    m.add_argument("--whiten", default=None, help="the whitening file of a whitened index (queries get it too)")
    m.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    from cfcd.cli.extract import add_runtime_choice

    add_runtime_choice(m)
    b = parser.add_argument_group("benchmark view")
    b.add_argument("--gnd", type=Path, default=None, help="revisitop ground truth gnd_<ds>.pkl of the indexed database")
    b.add_argument("--dataset", default=None, metavar="NAME",
                   help="instead of --gnd: a registered benchmark (gldv2_retrieval, roxford5k, ... as 'cfcd data "
                        "download' knows them) under --root, evaluated with its setups and metrics")
    b.add_argument("--root", type=Path, default=None, help="data root of --dataset (holding <NAME>/)")
    b.add_argument("--queries", type=Path, default=None,
                   help="query descriptor store of the benchmark (default: the queries are described at start-up "
                        "and cached)")
    b.add_argument("--compare", type=Path, default=None, metavar="BASELINE_INDEX_DIR",
                   help="the baseline: an index of the same database by another model; the page shows the change "
                        "from it to the served index (model - baseline)")
    b.add_argument("--compare-weights", default=None, help="weights of the baseline's model (default: its meta)")
    b.add_argument("--compare-queries", type=Path, default=None, help="query store of the baseline's model")
    s = parser.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    s.add_argument("--cache-dir", type=Path, default=None,
                   help="thumbnails, uploads and benchmark query stores (default <cfcd cache>/serve/<index>: "
                        "$CFCD_CACHE, else $XDG_CACHE_HOME/cfcd, else ~/.cache/cfcd)")
    s.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload in MB (default 20)")
    s.add_argument("--max-upload-pixels", type=int, default=40_000_000,
                   help="largest decoded upload in pixels (default 40M); larger images are refused unread")
    s.add_argument("--workers-queue", type=int, default=32,
                   help="searches that may wait for the model before the server answers 503 (default 32)")
    s.add_argument("--max-query-size", type=int, default=1024,
                   help="long side a query photo is described at, at most, when the index was extracted at full "
                        "resolution (default 1024; an index extracted with --max-size uses that)")
    s.add_argument("--cache-max-bytes", type=int, default=512 * 1024 * 1024,
                   help="disk budget of the kept uploads and thumbnails together (default 512 MiB; least recently "
                        "used removed first)")
    s.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a host name this server may be reached by besides localhost and the --host address "
                        "(requests naming another host get 421; repeat for several)")


def bind_socket(host: str, port: int):
    """The listening socket, bound now (before the model loads) so a port in use is said at once."""
    import socket

    from cfcd.errors import InputError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        import errno

        if exc.errno == errno.EADDRINUSE:
            raise InputError(f"port {port} is in use: pick another with --port (--port 0: any free port)") from None
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run(args: argparse.Namespace) -> int:
    import sys

    from cfcd.cli.extract import resolve_device
    from cfcd.errors import InputError
    from cfcd.serve.app import ServeConfig, create_app, load_state
    from cfcd.serve.service import Limits

    try:
        import uvicorn
    except ImportError:  # pragma: no cover - the serve extra installs it
        raise InputError("cfcd serve needs FastAPI and uvicorn: pip install 'cfcd[serve]'") from None
    if (args.max_upload_mb <= 0 or args.max_upload_pixels <= 0 or args.workers_queue <= 0 or args.max_query_size <= 0
            or args.cache_max_bytes <= 0):
        raise InputError("--max-upload-mb, --max-upload-pixels, --workers-queue, --max-query-size and "
                         "--cache-max-bytes must be positive")
    if args.root is not None and args.dataset is None:
        raise InputError("--root needs --dataset NAME (e.g. --dataset gldv2_retrieval)")
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_upload_pixels=args.max_upload_pixels,
                    max_waiting=args.workers_queue, max_query_size=args.max_query_size,
                    cache_max_bytes=args.cache_max_bytes)
    config = ServeConfig(
        index=args.index, images=args.images, model=args.model, weights=args.weights, whiten=args.whiten,
        gnd=args.gnd, dataset=args.dataset, root=args.root, queries=args.queries, compare=args.compare,
        compare_weights=args.compare_weights, compare_queries=args.compare_queries, device=resolve_device(args.device), runtime=args.runtime,
        cache_dir=args.cache_dir, limits=limits, host=args.host, allow_hosts=tuple(args.allow_host),
    )
    sock = bind_socket(args.host, args.port)
    try:
        port = sock.getsockname()[1]
        state = load_state(config, log=lambda message: print(message, file=sys.stderr))
        health = state.service.health()
        print(f"serving {args.index} ({health['index_type']}, {health['count']} x {health['dim']}, model {health['model']}); "
              f"images: {state.service.images.root or 'none (pass --images ROOT for thumbnails)'}; "
              f"cache: {state.service.cache_dir}", file=sys.stderr)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"WARNING: listening on {args.host}: there is no authentication; anyone who can reach this "
                  "address can search the index and see its images. Requests must name this host, localhost or "
                  "an --allow-host NAME", file=sys.stderr)
        app = create_app(config, state=state)
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"open http://{host}:{port}/ (Ctrl-C to stop)", file=sys.stderr, flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0
