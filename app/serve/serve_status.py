"""What Serve says about an application and its deployments, read cheaply enough to ask every second or two.

``serve.status()`` fetches the same details from the controller and then parses them into pydantic models, which
re-pickles every deployment's request router by value (``PrefixAffinityRouter``'s module): ~37 ms of CPU a call on
this machine, against ~2 ms for the controller's answer read as plain data. The load board asks every ``WATCH_S``
for as long as the app runs, and tests poll for deploys and deletions, so they read it here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class DeploymentState:
    status: str  # Serve's DeploymentStatus: HEALTHY, UPDATING, UPSCALING, DOWNSCALING, UNHEALTHY, DEPLOY_FAILED
    replica_states: dict[str, int] = field(default_factory=dict)  # replicas by state: RUNNING, STARTING, ...
    message: str = ""


@dataclass(frozen=True)
class AppState:
    status: str  # Serve's ApplicationStatus: DEPLOYING, RUNNING, DEPLOY_FAILED, DELETING, ...
    message: str = ""
    deployments: dict[str, DeploymentState] = field(default_factory=dict)


def _name(value) -> str:
    """An enum of Serve's (a str subclass) or a plain string, as the plain string."""
    return str(getattr(value, "value", value))


def app_states() -> dict[str, AppState]:
    """Every application Serve knows, by name (a deleted app is absent once its deletion finished)."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return {}
    apps = client.get_serve_details().get("applications") or {}
    return {name: AppState(_name(app["status"]), app.get("message") or "", {
        d: DeploymentState(_name(dep["status"]), dict(Counter(_name(r["state"]) for r in dep.get("replicas") or [])),
                           dep.get("message") or "")
        for d, dep in (app.get("deployments") or {}).items()}) for name, app in apps.items()}
