# The README's commands. Both `demo` and `test` create .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test unit proto bench soak clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/spiffe-sidecar demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest

unit: $(STAMP)
	$(PY) -m pytest tests/unit

# Micro-benchmarks of the pure hot functions, then the latency/throughput matrix against nginx and HAProxy
# (installs them with apt when missing). Quick form: `make bench BENCH_ARGS=--quick`. See benchmarks/README.md.
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m pytest benchmarks/micro -p no:cacheprovider --benchmark-columns=min,median,ops --benchmark-sort=name
	$(PY) benchmarks/harness.py $(BENCH_ARGS)

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
