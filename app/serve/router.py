"""A request's way from its prompt to a pool's replica; shared by the HTTP and the gRPC front ends.

The ``Router`` coordinates, and each step is a room of its own: it tokenizes the prompt, reads the pools' state from
the load board (``board_view``), prices every pool that can hold the request (``pricing``: its predicted time to
the last token, queue and cached prefix included), lets ``admission`` pick the route or refuse the request at once,
and has the ``dispatch``er run it there (retries, deadlines, aggregated or disaggregated). Within the chosen pool
``PrefixAffinityRouter`` then picks the replica that holds the prompt's prefix.

A pool still starting (no warmed replica) is priced only when no warmed pool can hold the request, and a pool whose
replicas all failed or that a retry avoids is not priced at all: asking it what it runs would wait for a replica. A
pool its autoscaler took to zero replicas is priced with its last measured cold start added to the wait (so it is
chosen only where starting it beats the other pools, and admission refuses it past ``max_queue_wait_s``); sending it
the request makes Serve start a replica.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from app.engine.blocks import prefix_hashes
from app.engine.messages import RequestError, Update
from app.engine.params import SamplingParams
from app.serve.admission import Admission, Offer
from app.serve.board_view import BoardView
from app.serve.config import AppConfig, PoolConfig
from app.serve.dispatch import Dispatcher, PoolHandles, remote
from app.serve.feedback import RouteFeedback
from app.serve.pricing import Route, cached_tokens, prefix_capacity, price
from app.serve.responses import Result
from strategies.layout import STRATEGY_NAMES, check_strategy
from strategies.loader import Checkpoint


class Router:
    def __init__(self, cfg: AppConfig, handles: dict[str, PoolHandles], board=None):
        self.cfg, self.handles = cfg, handles
        ckpt = Checkpoint(cfg.model)
        self.tokenizer, self.shape = ckpt.tokenizer(), ckpt.shape
        self.hardware = {p.name: p.priced_hardware() for p in cfg.pools}
        self.board = BoardView(cfg, board)
        self.admission = Admission(cfg)
        self.dispatch = Dispatcher(cfg, handles, self.board)
        self.feedback = RouteFeedback()
        self._available: dict[str, list[str]] = {}

    # -- tokenizing --------------------------------------------------------------------------------------------------

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            bad = [t for t in prompt if not 0 <= t < self.shape.vocab_size]
            if bad:
                raise RequestError(f"token id {bad[0]} is outside the vocabulary (0..{self.shape.vocab_size - 1})")
            return list(prompt)
        return list(self.tokenizer(prompt)["input_ids"])

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if self.tokenizer.chat_template is None:
            raise RequestError(f"model {self.cfg.model_name} has no chat template: use /v1/completions")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
        return list(ids)

    # -- picking a pool ----------------------------------------------------------------------------------------------

    async def available(self, pool: str) -> list[str]:
        """Strategies the pool's replicas can run (asked once, waiting while none is up: replicas of a pool are
        identical). A pool asleep at zero replicas, not asked yet, is priced by the named strategies meanwhile:
        asking would start a replica before admission has decided."""
        if pool not in self._available and self.board.asleep(self.cfg.pool(pool)):
            return list(STRATEGY_NAMES)
        if pool not in self._available:
            info = await remote(self.handles[pool].front.info)  # its own call id: choices may ask at once
            self._available[pool] = info["available"]
        return self._available[pool]

    async def pick_pool(self, prompt: Sequence[int] | int, max_tokens: int, pool: str | None = None,
                        strategy: str = "auto", avoid: frozenset[str] = frozenset()) -> Route:
        """The route ``admission`` picks among the pools that can hold the request (``pool``: only that one),
        each priced; pools in ``avoid`` and pools whose replicas all failed are not priced. ``prompt``: its token
        ids, or only their count (then no pool is credited with its prefix)."""
        n = prompt if isinstance(prompt, int) else len(prompt)
        if pool is not None and pool not in self.dispatch.queued:
            raise RequestError(f"unknown pool {pool!r}: choose one of {', '.join(self.dispatch.queued)}")
        strategy = check_strategy(strategy, allow_auto=True, error=RequestError)
        self.board.watch()
        self.admission.open(self.board.draining)
        pools = [p for p in self.cfg.pools if pool in (None, p.name)]
        limit = {p.name: p.context(self.shape.max_position_embeddings) for p in pools}
        fits = [p for p in pools if n + max_tokens <= limit[p.name]]
        if not fits:
            raise RequestError(f"prompt ({n} tokens) + max_tokens ({max_tokens}) = {n + max_tokens} exceeds the "
                               f"context limit of every pool ({max(limit.values())} tokens at most)")
        warm = ({p.name for p in fits if self.board.warmed(p) or self.board.asleep(p)}
                or {p.name for p in fits})  # starting: if no other fits
        chains: dict[int, list[int]] = {}  # block size -> the prompt's hash chain
        offers = []
        for p in fits:
            offers.append(offer := Offer(pool=p, queued_tokens=self.dispatch.queued[p.name], grows=self.grows(p),
                                         overflow=n < p.min_prompt_tokens))
            if p.name not in warm:
                offer.unpriced = "starting"
            elif p.name in avoid or not self.board.serving(p):
                offer.unpriced = "down"
            elif strategy != "auto" and strategy not in await self.available(p.name):
                offer.unpriced = "unbuilt"  # built at start or never: a step builds nothing
            else:
                offer.route = self.price(p, prompt, n, max_tokens, strategy, await self.available(p.name), chains)
            offer.runs = self._available.get(p.name)
        return self.admission.choose(n, strategy, offers)

    def grows(self, pool: PoolConfig) -> bool:
        """Whether ``pool`` may still add a replica: it autoscales and fewer than its ``max_replicas`` report."""
        scaling = pool.autoscaling
        return scaling is not None and len(self.board.loads(pool.name)) < scaling.max_replicas

    def price(self, pool: PoolConfig, prompt: Sequence[int] | int, n: int, max_tokens: int, strategy: str,
              available: list[str], chains: dict[int, list[int]]) -> Route | None:
        """``pricing.price`` for ``pool`` with what the board and this ingress know of its load, the prompt's
        cached prefix credited (``chains``: its hash chain by block size, filled on first need)."""
        load = self.dispatch.load(pool)
        hashes, cached = None, 0
        if not isinstance(prompt, int):
            if pool.block_size not in chains:
                chains[pool.block_size] = prefix_hashes(prompt, pool.block_size)
            hashes = chains[pool.block_size]
        if hashes:
            index = self.dispatch.prefixes[pool.name]
            index.resize(prefix_capacity(load))
            cached = cached_tokens(index.matched(pool.name, hashes), n, pool.block_size)
        route = price(pool, self.shape, self.hardware[pool.name], load, n, max_tokens, strategy, available, cached,
                      hashes, self.feedback.table() if pool.online_correction else None)
        if route is not None and (cold := self.board.cold_start(pool)):  # asleep: a replica must start first
            route.predicted_s, route.ttft_s, route.wait_s = (x + cold for x in (route.predicted_s, route.ttft_s,
                                                                                 route.wait_s))
        return route

    def learn(self, result: Result) -> None:
        """A request that ended well: what it took against how its route was priced (``feedback``)."""
        if (route := result.route) is not None and route.pool.online_correction:
            self.feedback.observe(route.pool.name, result.prompt_tokens - route.cached_tokens, route.cached_tokens,
                                  *route.raw, result.ttft_s, result.tpot_s)

    # -- running -----------------------------------------------------------------------------------------------------

    async def start(self, prompt_ids: list[int], params: SamplingParams, pool: str | None, strategy: str,
                    whole: bool = False, timeout_s: float | None = None
                    ) -> tuple[Route, int, Update, AsyncIterator[Update]]:
        """Route the request and run it up to its first update (``Dispatcher.start``: retries elsewhere)."""
        return await self.dispatch.start(self.pick_pool, prompt_ids, params, pool, strategy, whole, timeout_s)
