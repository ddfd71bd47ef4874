"""The Serve application builder: ``import_path: app.serve_app:build_app`` in ``serve_config.yaml``.

Turns the validated ``AppConfig`` into one engine deployment per aggregated pool (named after the pool), a
``<pool>-prefill`` and a ``<pool>-decode`` deployment per disaggregated pool, and the ingress that holds their handles.
"""

from ray.serve import Application

from app.engine_deployment import DecodeReplica, EngineReplica, PrefillReplica
from app.ingress import Ingress
from app.pools import AppConfig


def build_app(args: dict) -> Application:
    # No ``from __future__ import annotations`` here: Serve inspects this signature.
    cfg = AppConfig.model_validate(args)
    handles: dict[str, dict] = {}
    grace = cfg.graceful_shutdown_s
    for pool in cfg.pools:
        opts = pool.engine_options(cfg.model, cfg.shared_weights)
        bundle = pool.bundle()
        if pool.disaggregated:
            handles[pool.name] = {
                "prefill": PrefillReplica.options(**pool.deployment_options(f"{pool.name}-prefill", grace))
                .bind(pool.name, opts, bundle),
                "decode": DecodeReplica.options(**pool.deployment_options(f"{pool.name}-decode", grace,
                                                                          replicas=pool.decode_replicas))
                .bind(pool.name, opts, bundle),
            }
        else:
            handles[pool.name] = {
                "engine": EngineReplica.options(**pool.deployment_options(pool.name, grace)).bind(pool.name, opts,
                                                                                                   bundle)}
    return Ingress.options(num_replicas=cfg.ingress_replicas, max_ongoing_requests=1024,
                           ray_actor_options={"num_cpus": cfg.ingress_num_cpus},
                           graceful_shutdown_timeout_s=grace,
                           graceful_shutdown_wait_loop_s=min(1.0, grace)).bind(cfg.model_dump(), handles)
