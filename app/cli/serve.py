"""``dynpart serve [CONFIG]``: ``serve run CONFIG`` that lets in-flight requests finish on Ctrl-C.

Serve's own shutdown (what ``serve run`` does on Ctrl-C) stops the HTTP and gRPC proxies at once, which cuts every
stream in flight. This command runs the same ``serve run`` in this process and, on the first Ctrl-C, drains before it
lets ``serve run`` shut down: each app's ``LoadBoard`` tells its ingresses to refuse new requests (503, retry against
another server), then the command waits until every engine replica has reported nothing running or waiting for a
second, at most the app's ``graceful_shutdown_s``. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

IDLE_S = 1.0  # engines idle this long: nothing is in flight (reports come every 0.25 s; a request admitted just
# before the ingresses read the drain reaches its engine within that)


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve run CONFIG; on Ctrl-C, finish the requests in flight, then stop")
    p.add_argument("config", nargs="?", default="serve_config.yaml", help="a Serve config (default: %(default)s)")
    p.set_defaults(func=serve_and_drain)


def read_spec(config: Path) -> dict:
    import yaml

    return yaml.safe_load(config.read_text())


def dynpart_apps(spec: dict) -> list[dict]:
    """The Serve config's applications that are dynpart apps (others it may also run are not ours to drain)."""
    return [a for a in spec.get("applications") or [] if str(a.get("import_path", "")).startswith("app.serve.app:")]


def apps_to_drain(config: Path) -> dict[str, float]:
    """The config's dynpart applications by name, with their ``graceful_shutdown_s``."""
    from app.serve.config import AppConfig

    default = AppConfig.model_fields["graceful_shutdown_s"].default
    return {a.get("name", "default"): float((a.get("args") or {}).get("graceful_shutdown_s", default))
            for a in dynpart_apps(read_spec(config))}


def pinned_cores(config: Path) -> int:
    """Cores the config's dynpart pools claim whole for their devices when they start (``PoolConfig.pinned_cores``)."""
    from app.serve.config import AppConfig

    return sum(pool.pinned_cores() for a in dynpart_apps(read_spec(config))
               for pool in AppConfig.model_validate(a.get("args") or {}).pools)


def engine_free_cores(config: Path) -> list[int]:
    """The cores the config's engines leave to Ray and Serve's processes (the devices claim theirs:
    placement/cores.py); [] when nothing is pinned (no whole-core device, or no ``sched_setaffinity``)."""
    from placement.cores import service_cores

    return service_cores(n) if hasattr(os, "sched_setaffinity") and (n := pinned_cores(config)) else []


def descendants(pid: int) -> list[int]:
    """Every process started, directly or not, by ``pid`` (Linux: from ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit():  # "pid (comm) state ppid ...": comm may hold spaces and parentheses
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def keep_off_engine_cores(cores: list[int]) -> None:
    """Once the engines have started, this process and the Ray it started on ``cores``, off the engines' cores
    (processes Ray starts later inherit it from the raylet). Not before: start-up (every process importing torch,
    the engines loading weights) uses every core, and an engine pins itself when it claims its cores."""
    from placement.cores import pin_unpinned

    moved = pin_unpinned([os.getpid(), *descendants(os.getpid())], cores)
    say(f"{moved} Ray and Serve processes moved to core(s) {','.join(map(str, cores))}, off the engines' cores")


def in_flight(boards: dict) -> int:
    """Sequences running or waiting in every engine replica of ``boards``' apps, as they last reported."""
    return sum(x.running + x.waiting for board in boards.values()
               for loads in board.snapshot.remote().result(timeout_s=10).values() for x in loads)


def drain(apps: dict[str, float]) -> None:
    from ray import serve

    boards = {name: serve.get_deployment_handle("LoadBoard", name) for name in apps}
    for board in boards.values():
        board.drain.remote().result(timeout_s=10)
    grace = max(apps.values())
    say(f"draining: new requests are refused (503); waiting up to {grace:g} s for those in flight "
        "(Ctrl-C again to stop now)")
    start = time.monotonic()
    idle_since, told = None, None
    while (waited := time.monotonic() - start) < grace:
        busy = in_flight(boards)
        if busy:
            idle_since = None
            if busy != told:
                say(f"{busy} request(s) in flight after {waited:.1f} s")
                told = busy
        elif idle_since is None:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since >= IDLE_S:
            say(f"drained in {waited:.1f} s; shutting down")
            return
        time.sleep(0.25)
    say(f"{in_flight(boards)} request(s) still in flight after graceful_shutdown_s ({grace:g} s); shutting down")


def say(message: str) -> None:
    print(f"dynpart serve: {message}", file=sys.stderr, flush=True)


def health_urls(config: Path) -> dict[str, str]:
    """Each dynpart application's ``/health`` URL on this machine, from the config's ``http_options`` and the app's
    ``route_prefix``."""
    spec = read_spec(config)
    http = spec.get("http_options") or {}
    host = http.get("host", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{host}:{http.get('port', 8000)}"
    return {a.get("name", "default"): base + (a.get("route_prefix") or "/").rstrip("/") + "/health"
            for a in dynpart_apps(spec)}


def announce_ready(urls: dict[str, str], service_cores: list[int], poll_s: float = 0.5) -> None:
    """Once every app's ``/health`` says ``ok`` (every pool has a replica whose engine has run its warm-up steps;
    Serve's own "Deployed app" comes when the replicas run, and the ingress answers before that), move Ray and
    Serve's processes to ``service_cores`` (none: they stay where they are), then print one line per app."""
    import httpx

    started, waiting, ready = time.monotonic(), dict(urls), []
    with httpx.Client(timeout=5) as client:  # one for the polls: each new client builds an SSL context (~25 ms CPU)
        while waiting:
            for name, url in list(waiting.items()):
                try:
                    health = client.get(url).json()
                except (httpx.HTTPError, ValueError):
                    continue
                if health.get("status") == "ok":
                    ready.append(f"ready: app {name!r} serves {health.get('model')} on "
                                 f"{url.removesuffix('/health')} (every pool has a warmed replica: "
                                 f"{', '.join(health.get('pools', {}))}) after {time.monotonic() - started:.0f} s")
                    del waiting[name]
            if waiting:
                time.sleep(poll_s)
    if service_cores:
        keep_off_engine_cores(service_cores)
    for line in ready:
        say(line)


def serve_and_drain(args: argparse.Namespace) -> int:
    from ray.serve.scripts import run

    from placement.workers import local_ray_options

    config = Path(args.config)
    if not config.is_file():
        raise FileNotFoundError(f"no Serve config at {config}")
    apps = apps_to_drain(config)
    local_ray_options()  # the environment a local Ray needs here (token auth off)
    cores = engine_free_cores(config)

    def on_ctrl_c(signum, frame) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
        try:
            if apps:
                drain(apps)
        except KeyboardInterrupt:
            say("stopping without waiting")
        except Exception as e:  # noqa: BLE001 - the app never came up, or is half gone: shut down anyway
            say(f"could not drain ({type(e).__name__}: {e}); shutting down")
        raise KeyboardInterrupt  # serve run's own shutdown: deletes the apps, stops the proxies and Ray

    signal.signal(signal.SIGINT, on_ctrl_c)
    threading.Thread(target=announce_ready, args=(health_urls(config), cores), name="ready", daemon=True).start()
    return run.main([str(config)], prog_name="dynpart serve", standalone_mode=False) or 0
