# The README's commands. Both `demo` and `test` create .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test unit proto bench soak clean compiled

# The data plane's hot modules compiled with mypyc (gcc, about 2 minutes on 2 cores) into a copy of the
# package, build/compiled/sidecar: C extensions beside the pure-Python modules. `make demo` and `make bench`
# run it (PYTHONPATH puts it first); `make test` runs the whole suite on the pure-Python source, then the
# data-plane tests again on the compiled copy. PURE=1 runs demo and bench on the pure-Python source.
COMPILED := build/compiled
MYPYC_MODULES := exchange timers http1 h1reader proxy relay listener policy identity observer upstream inbound outbound
ifeq ($(PURE),1)
RUN_ENV :=
RUN_DEP :=
else
RUN_ENV := PYTHONPATH=$(CURDIR)/$(COMPILED)
RUN_DEP := $(COMPILED)/.built
endif

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

$(COMPILED)/.built: $(STAMP) $(wildcard sidecar/*.py)
	rm -rf $(COMPILED) && mkdir -p $(COMPILED)
	cp -r sidecar pyproject.toml $(COMPILED)/
	cd $(COMPILED) && $(CURDIR)/$(VENV)/bin/mypyc $(MYPYC_MODULES:%=sidecar/%.py) > mypyc.log 2>&1 \
		|| { tail -40 mypyc.log; exit 1; }
	rm -rf $(COMPILED)/build
	touch $@

compiled: $(COMPILED)/.built

demo: $(STAMP) $(RUN_DEP)
	$(RUN_ENV) $(VENV)/bin/spiffe-sidecar demo --config-dir $(CURDIR)/config

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest
	$(MAKE) compiled
	# The data-plane tests again, on the compiled modules (tests/conftest.py checks they are the ones loaded).
	SPIFFE_SIDECAR_EXPECT_COMPILED=1 PYTHONSAFEPATH=1 PYTHONPATH=$(CURDIR)/$(COMPILED) $(PY) -m pytest \
		-p no:cacheprovider --import-mode=append tests/unit/test_exchange.py tests/unit/test_h1reader.py \
		tests/unit/test_http1.py tests/unit/test_policy.py tests/integration/test_inbound.py \
		tests/integration/test_outbound.py tests/integration/test_hostile.py tests/integration/test_upstream.py \
		tests/e2e/test_service_to_service.py

unit: $(STAMP)
	$(PY) -m pytest tests/unit

# Micro-benchmarks of the pure hot functions, then the latency/throughput matrix against nginx and HAProxy
# (installs them with apt when missing). Quick form: `make bench BENCH_ARGS=--quick`. See benchmarks/README.md.
bench: $(STAMP) $(RUN_DEP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m pytest benchmarks/micro -p no:cacheprovider --benchmark-columns=min,median,ops --benchmark-sort=name
	$(PY) benchmarks/micro/inbound_glue.py
	$(if $(RUN_DEP),$(RUN_ENV) $(PY) benchmarks/micro/inbound_glue.py $(CURDIR)/$(COMPILED))
	$(RUN_ENV) $(PY) benchmarks/harness.py $(BENCH_ARGS)
	$(RUN_ENV) $(PY) benchmarks/memory_bench.py $(filter --quick,$(BENCH_ARGS))

# The long soak (10 minutes at a steady rate, rotations, reloads, an agent restart); writes
# benchmarks/results/soak-<date>.json. `make test` runs its one-minute form.
soak: $(STAMP)
	$(PY) benchmarks/soak.py --seconds 600

# Regenerate the committed Workload API modules from sidecar/_proto/workload.proto.
proto: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev]'
	cd sidecar/_proto && PATH=$(CURDIR)/$(VENV)/bin:$$PATH ../../$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. \
		--grpclib_python_out=. workload.proto
	sed -i 's/^import workload_pb2$$/from . import workload_pb2/' sidecar/_proto/workload_grpc.py
	# The spec's proto has no package, so its symbols would collide with py-spiffe's copy in the
	# default descriptor pool; ours live in a private pool (same wire format).
	sed -i 's/^DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(/_pool = _descriptor_pool.DescriptorPool()\n_pool.AddSerializedFile(google_dot_protobuf_dot_struct__pb2.DESCRIPTOR.serialized_pb)\nDESCRIPTOR = _pool.AddSerializedFile(/' sidecar/_proto/workload_pb2.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
