"""The application's configuration (``serve_config.yaml`` → ``args``): the model and its hardware pools.

A pool is a set of identical engine replicas: a device type from the hardware catalog (what the planner prices),
devices per replica, replica bounds / autoscaling, and request limits. ``bundle`` turns it into the Ray resources of
one device so a replica's placement group lands only on nodes that offer them: a GPU (plus ``accelerator_type``, by
default the hardware entry's) on GPU nodes, the ``dynpart_device`` custom resource on CPU nodes, plus any custom
resources naming the pool's nodes.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from app.engine.options import EngineFields, EngineOptions
from placement.bundles import DEVICE_RESOURCE, actor_resources
from cost import Hardware, get_hardware
from cost.autoscale import SLOTarget
from strategies.layout import STRATEGY_NAMES, check_strategy
from strategies.loader import DEFAULT_MODEL


DEFAULT_MAX_QUEUE_WAIT_S = 30.0
# A replica being stopped looks this often whether its requests are done (Serve sleeps this long before its first
# look: at Serve's default of 2 s, every idle replica took 2 s to stop, and a redeploy or scale-down waited for it)
SHUTDOWN_CHECK_S = 0.2


class Autoscaling(BaseModel):
    """Serve's ``autoscaling_config`` (the keys used here; see Ray Serve's AutoscalingConfig for the rest), and which
    policy sizes the pool: ``default`` (Serve's, on ongoing requests per replica) or ``slo`` (``slo_policy.py``: the
    replica count the cost model predicts the pool's ``slo`` needs; Serve's own delays are then off and
    ``downscale_delay_s`` is the policy's cooldown)."""

    model_config = ConfigDict(extra="allow")

    policy: Literal["default", "slo"] = "default"
    cold_start_s: float = Field(30.0, ge=0)  # slo: how far ahead the policy forecasts the rate (a replica's start)
    # slo: "cheapest" hands this pool's growth to another "cheapest" pool of the app that carries the overflow for
    # less (``cost/growth.py``; measured in the simulator, not always cheaper: BENCHMARKS.md); "own": it grows itself
    grow: Literal["own", "cheapest"] = "own"
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = None
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0

    def serve_config(self) -> dict[str, Any]:
        """The keys Serve takes: ours dropped; under ``slo`` Serve's delays off (the policy has its own)."""
        keys = self.model_dump(exclude_none=True, exclude={"policy", "cold_start_s", "grow"})
        if self.policy == "slo":
            keys.update(upscale_delay_s=0.0, downscale_delay_s=0.0)
        return keys


class PoolConfig(EngineFields):
    """One pool: the engine fields (``EngineFields``) of its replicas, where they run, how many, and its limits."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    hardware: str = "cpu"  # hardware catalog entry the planner prices this pool's devices as
    gpu: bool = False  # devices are GPUs (else CPU processes with gloo)
    # Ray's accelerator type of the GPUs, e.g. "L4", "A100"; a GPU pool's defaults to its hardware entry's
    accelerator_type: str | None = None
    resources: dict[str, float] = Field(default_factory=dict)  # extra custom resources per device
    placement_strategy: Literal["PACK", "STRICT_PACK"] = "STRICT_PACK"
    num_replicas: int = Field(1, ge=1)  # fixed replica count when ``autoscaling`` is absent
    autoscaling: Autoscaling | None = None
    # latency objectives the ``slo`` policy sizes the pool for: {ttft_s, tpot_s, percentile} (default 1 s, 0.1 s, p90)
    slo: SLOTarget | None = None
    # per replica; default max_num_seqs: what the engine holds, so no request waits where its load report cannot see
    # it (beyond it they wait in the ingress's handle queue, which the ingress counts itself)
    max_ongoing_requests: int | None = Field(None, ge=1)
    max_queued_requests: int = Field(64, ge=-1)  # per caller (the ingress) beyond which requests get 503
    max_queued_tokens: int = Field(65536, ge=1)  # prompt tokens waiting for prefill beyond which the pool is full
    # shorter prompts go to another pool that admits them, here only when none does (the pool's requests classed by
    # input length: a pool that time-shares the cores the service runs on slows every other pool while it computes)
    min_prompt_tokens: int = Field(0, ge=0)
    disaggregated: bool = False  # separate prefill and decode deployments, K/V handed over via the object store
    decode_replicas: int = Field(1, ge=1)  # decode deployment's replica count when disaggregated
    health_check_period_s: float = Field(10.0, gt=0)  # how soon Serve notices a failed replica and replaces it

    @model_validator(mode="before")
    @classmethod
    def _targets_from_slo(cls, data: Any) -> Any:
        """The pool's ``slo.tpot_s`` is the target its steps are sized for (``step_budget``), its ``slo.ttft_s`` the
        deadline a prompt read beside streams is hurried to; a ``tpot_s`` or ``ttft_s`` that disagrees with them is
        an error (two targets for one pool)."""
        slo = data.get("slo") if isinstance(data, dict) else None
        if slo is None:
            return data
        targets = {}
        for key in ("tpot_s", "ttft_s"):
            target = slo.get(key, SLOTarget.model_fields[key].default) if isinstance(slo, dict) else getattr(slo, key)
            if data.get(key) is not None and data[key] != target:
                raise ValueError(f"{key} {data[key]} disagrees with slo.{key} {target}: set one of them")
            targets[key] = target
        return {**data, **targets}

    @model_validator(mode="after")
    def _ongoing_default(self) -> PoolConfig:
        if self.max_ongoing_requests is None:
            self.max_ongoing_requests = self.max_num_seqs
        return self

    @model_validator(mode="after")
    def _slo_policy(self) -> PoolConfig:
        """``slo`` without the policy that reads it would be silently ignored: an error instead."""
        scaled_by_slo = self.autoscaling is not None and self.autoscaling.policy == "slo"
        if self.slo is not None and not scaled_by_slo:
            raise ValueError(f"pool {self.name!r}: slo is only read by the slo autoscaling policy: add "
                             f"autoscaling: {{policy: slo, min_replicas: ..., max_replicas: ...}}")
        if scaled_by_slo and self.slo is None:
            self.slo = SLOTarget()
        if self.autoscaling is not None and self.autoscaling.grow != "own" and not scaled_by_slo:
            raise ValueError(f"pool {self.name!r}: autoscaling.grow is only read by the slo autoscaling policy: add "
                             f"policy: slo")
        return self

    @model_validator(mode="after")
    def _accelerator_type(self) -> PoolConfig:
        """A GPU pool asks Ray for its catalog entry's accelerator type unless it names one; naming another is an
        error (the planner would price one device while Ray places the replicas on another)."""
        if not self.gpu:
            return self
        catalog_type = get_hardware(self.hardware, use_profile=False).accelerator_type
        if self.accelerator_type is None:
            self.accelerator_type = catalog_type
        elif catalog_type is not None and self.accelerator_type != catalog_type:
            raise ValueError(f"pool {self.name!r}: accelerator_type {self.accelerator_type!r} disagrees with "
                             f"hardware {self.hardware!r}, whose catalog accelerator_type is {catalog_type!r}: drop "
                             f"accelerator_type, or set hardware to the catalog entry of that GPU")
        return self

    def pinned_cores(self) -> int:
        """Cores this pool's replicas claim whole when it starts (``pin_cores``, placement/cores.py): what ``dynpart
        serve`` keeps Ray's and Serve's own processes off."""
        if self.gpu or not self.pin_cores or self.cpus_per_device < 1:
            return 0
        a = self.autoscaling
        replicas = self.num_replicas if a is None else (a.initial_replicas or a.min_replicas)
        if self.disaggregated:
            replicas += self.decode_replicas
        return replicas * self.devices * int(self.cpus_per_device)

    def bundle(self, counted_cpu_devices: bool = False) -> dict[str, float]:
        """One device of this pool as Ray resources: ``cpus_per_device`` cores, and a GPU, or one
        ``dynpart_device`` where the cluster counts emulated CPU devices (``counted_cpu_devices``)."""
        if self.gpu:
            device = {"CPU": self.cpus_per_device, "GPU": 1.0}
            if self.accelerator_type:
                device[f"accelerator_type:{self.accelerator_type}"] = 0.001
        else:
            device = {"CPU": self.cpus_per_device, **({DEVICE_RESOURCE: 1.0} if counted_cpu_devices else {})}
        return {**device, **self.resources}

    def replica_actor_options(self, bundle: dict[str, float]) -> dict[str, Any]:
        """The engine replica runs in bundle 0 and *is* that device: it takes the whole bundle, and the engine runs
        in its process as rank 0 (``ShardGroup``'s ``local_rank0``); the other ranks' shard workers take one bundle
        each."""
        return actor_resources(bundle)

    @property
    def deployments(self) -> dict[str, str]:
        """The pool's Serve deployments by role: ``engine``, or a disaggregated pool's ``prefill`` and ``decode``."""
        if self.disaggregated:
            return {"prefill": f"{self.name}-prefill", "decode": f"{self.name}-decode"}
        return {"engine": self.name}

    def priced_hardware(self) -> Hardware:
        """What the planner prices one of this pool's devices as: its catalog entry (or calibration profile), a CPU
        device slowed to its share of a core when ranks share cores."""
        hardware = get_hardware(self.hardware)
        return hardware if self.gpu else hardware.time_shared(self.cpus_per_device)

    def engine_options(self, model: str, shared_weights: bool) -> EngineOptions:
        shared = self.model_dump(include=set(EngineFields.model_fields))
        return EngineOptions(model=model, hardware=self.hardware, shared_weights=shared_weights, **shared)

    def deployment_options(self, name: str, bundle: dict[str, float], graceful_shutdown_s: float,
                           replicas: int | None = None) -> dict[str, Any]:
        """``.options(...)`` of one of this pool's engine deployments (replica count fixed by ``replicas``)."""
        opts: dict[str, Any] = dict(
            name=name, placement_group_bundles=[bundle] * self.devices,
            placement_group_strategy=self.placement_strategy,
            ray_actor_options=self.replica_actor_options(bundle),
            max_ongoing_requests=self.max_ongoing_requests, max_queued_requests=self.max_queued_requests,
            graceful_shutdown_timeout_s=graceful_shutdown_s,
            graceful_shutdown_wait_loop_s=min(SHUTDOWN_CHECK_S, graceful_shutdown_s),
            health_check_period_s=self.health_check_period_s, health_check_timeout_s=60.0,
        )
        if replicas is None and self.autoscaling is not None:
            opts["autoscaling_config"] = self.autoscaling.serve_config()
        else:
            opts["num_replicas"] = replicas or self.num_replicas
        return opts


class AppConfig(BaseModel):
    """``args`` of the Serve application."""

    model_config = ConfigDict(extra="forbid")

    model: str = DEFAULT_MODEL  # "smollm2-135m" or a local Llama folder
    served_model_name: str | None = None  # the name clients pass as ``model`` (default: ``model``)
    shared_weights: bool = True  # replicas on a node share one copy of the weights through the object store
    pools: list[PoolConfig] = Field(min_length=1)
    ingress_replicas: int = Field(1, ge=1)
    ingress_num_cpus: float = Field(0.1, ge=0)
    # Custom resources the ingress and the load board need (e.g. {"head": 0.01}): pins them to nodes that offer them,
    # so losing a pool's node never takes the ingress with it.
    ingress_resources: dict[str, float] = Field(default_factory=dict)
    graceful_shutdown_s: float = Field(30.0, ge=0)  # a replica being stopped finishes its requests within this
    # How prefills pick a strategy when a request names none: the planner per batch ("dynamic"), or one fixed
    # strategy for every prefill ("static:<strategy>"), which is what the load tests compare dynamic against.
    policy: str = "dynamic"
    # Security and limits (RELIABILITY.md). With an API key, every request but ``/health`` needs
    # ``Authorization: Bearer <key>`` (gRPC: ``authorization`` metadata); the default is $DYNPART_API_KEY if set.
    api_key: SecretStr | None = Field(default_factory=lambda: os.environ.get("DYNPART_API_KEY") or None,
                                      validate_default=True)
    grpc_remote_clients: bool = False  # Serve's gRPC proxy listens on every interface: refuse non-local peers
    max_body_bytes: int = Field(1 << 20, ge=1024)  # larger request bodies get 413
    max_tokens_limit: int = Field(4096, ge=1)  # the most tokens one request may ask to generate
    request_timeout_s: float | None = Field(600.0, gt=0)  # from arrival to the last token; then 504 (None: none)
    # Admission: a pool whose expected wait before prefill (its replicas' queued prefill and decode work, priced by
    # the planner and the measured step time) is longer than this takes no new request; with no pool left the
    # request gets 503 at once, with ``retry-after``, instead of waiting past the client's patience. Default: 30 s,
    # or half of ``request_timeout_s`` when that is shorter.
    max_queue_wait_s: float | None = Field(None, gt=0)
    # A request whose replica fails before it produced anything (a stream's first token, a whole answer) is started
    # again on another replica of its pool or on another pool that fits, at most this many times (0: never).
    max_retries: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _unique(self) -> AppConfig:
        names = [p.name for p in self.pools]
        if len(set(names)) != len(names):
            raise ValueError(f"pool names must be unique: {names}")
        timeout = self.request_timeout_s
        if self.max_queue_wait_s is None:
            self.max_queue_wait_s = DEFAULT_MAX_QUEUE_WAIT_S if timeout is None else min(DEFAULT_MAX_QUEUE_WAIT_S,
                                                                                         timeout / 2)
        elif timeout is not None and self.max_queue_wait_s >= timeout:
            raise ValueError(f"max_queue_wait_s ({self.max_queue_wait_s:g}) must be below request_timeout_s "
                             f"({timeout:g}): a request admitted to wait that long would time out")
        if self.policy != "dynamic":
            if not self.policy.startswith("static:"):
                raise ValueError(f"policy {self.policy!r} is not 'dynamic' or 'static:<strategy or layout label>' "
                                 f"(e.g. static:{STRATEGY_NAMES[0]})")
            self.policy = "static:" + check_strategy(self.policy.removeprefix("static:"))
        return self

    @property
    def default_strategy(self) -> str:
        """What a request that names no strategy gets: ``auto`` (the planner) or the static policy's strategy."""
        return self.policy.removeprefix("static:") if self.policy.startswith("static:") else "auto"

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    def pool(self, name: str) -> PoolConfig:
        return next(p for p in self.pools if p.name == name)
