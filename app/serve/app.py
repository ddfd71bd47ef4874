"""The Serve application builder: ``import_path: app.serve.app:build_app`` in ``serve_config.yaml``.

Turns the validated ``AppConfig`` into one engine deployment per aggregated pool (named after the pool), a
``<pool>-prefill`` and a ``<pool>-decode`` deployment per disaggregated pool, and the ingress that holds their handles.
Every engine deployment routes with ``PrefixAffinityRouter`` (by prompt prefix at the pool's KV block size; decode
calls carry K/V, not a prompt), which also keeps requests off replicas known to have failed. A pool under
``autoscaling.policy: slo`` gets ``slo_policy.SLOPolicy`` as its engine (or prefill) deployment's Serve policy.
"""

import ray
from ray.serve import Application

from app.serve.config import SHUTDOWN_CHECK_S, AppConfig
from app.serve.ingress import Ingress
from app.serve.load import LoadBoard
from app.serve.prefix_router import prefix_router_config
from app.serve.replicas import DecodeReplica, EngineReplica, PrefillReplica
from app.serve.slo_policy import autoscaling_policy
from placement.bundles import DEVICE_RESOURCE
from strategies.loader import Checkpoint


def build_app(args: dict) -> Application:
    # No ``from __future__ import annotations`` here: Serve inspects this signature.
    cfg = AppConfig.model_validate(args)
    counted = ray.is_initialized() and ray.cluster_resources().get(DEVICE_RESOURCE, 0) >= 1
    grace = cfg.graceful_shutdown_s
    handles: dict[str, dict] = {}
    board = LoadBoard.options(ray_actor_options={"num_cpus": 0, "resources": cfg.ingress_resources},
                              graceful_shutdown_timeout_s=grace, graceful_shutdown_wait_loop_s=SHUTDOWN_CHECK_S).bind()
    for pool in cfg.pools:
        opts, bundle = pool.engine_options(cfg.model, cfg.shared_weights), pool.bundle(counted)

        def deployment(cls, name: str, replicas: int | None = None):
            options = pool.deployment_options(name, bundle, grace, replicas)
            options["request_router_config"] = prefix_router_config(pool.block_size)
            if "autoscaling_config" in options and pool.autoscaling.policy == "slo":
                options["autoscaling_config"]["policy"] = autoscaling_policy(pool, Checkpoint(cfg.model).shape)
            return cls.options(**options).bind(pool.name, opts, bundle, board)

        names = pool.deployments
        if pool.disaggregated:
            handles[pool.name] = {"prefill": deployment(PrefillReplica, names["prefill"]),
                                  "decode": deployment(DecodeReplica, names["decode"], pool.decode_replicas)}
        else:
            handles[pool.name] = {"engine": deployment(EngineReplica, names["engine"])}
    return Ingress.options(num_replicas=cfg.ingress_replicas, max_ongoing_requests=1024,
                           ray_actor_options={"num_cpus": cfg.ingress_num_cpus, "resources": cfg.ingress_resources},
                           graceful_shutdown_timeout_s=grace,
                           graceful_shutdown_wait_loop_s=min(SHUTDOWN_CHECK_S, grace)).bind(cfg.model_dump(), handles,
                                                                                            board)
