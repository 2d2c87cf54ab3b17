# Every target does the set-up it needs, so each works as the first command on a fresh machine.
VENV := .venv
BIN := $(VENV)/bin
PYTHON ?= python3
# nftables brings libnftables; util-linux gives nsenter/setpriv (traffic as another uid); iptables
# and ipset recreate Istio's iptables backend for the migration tests; containerd, runc, the
# reference CNI plugins and busybox-static (the pause image) run tests/test_containerd.py; podman
# builds and runs the image (tests/test_image.py), mmdebstrap makes its base where no registry is
# reachable.
APT_PACKAGES := nftables iproute2 util-linux iptables ipset \
	containerd runc containernetworking-plugins busybox-static podman mmdebstrap
# The CNI plugin: a static executable built offline from cniplugin/ (standard library only), with
# no paths, VCS stamp or build id in it, so that two builds are byte-identical.
CNI_PLUGIN ?= build/cni/ztunnel-redirect-cni

.PHONY: setup system-packages cni-plugin test lint demo proto bench bench-quick soak image clean

setup: $(VENV)/.installed

# Debian's python3 creates venvs only with python3-venv (ensurepip); a pyenv or image Python has it.
system-packages:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	$(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1 || missing="$$missing python3 python3-venv"; \
	command -v go >/dev/null 2>&1 || missing="$$missing golang-go"; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml | system-packages
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $@

cni-plugin: system-packages
	cd cniplugin && CGO_ENABLED=0 GOPROXY=off go build -trimpath -buildvcs=false \
		-ldflags='-s -w -buildid=' -o $(abspath $(CNI_PLUGIN)) ./

lint: setup
	$(BIN)/ruff check ztunnel_redirect tests bench
	$(BIN)/ruff format --check ztunnel_redirect tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports
	test -z "$$(gofmt -l cniplugin)" || { gofmt -l cniplugin; exit 1; }
	cd cniplugin && GOPROXY=off go vet ./...

test: setup system-packages lint
	cd cniplugin && GOPROXY=off go test ./...
	$(BIN)/pytest

demo: setup system-packages
	$(BIN)/python -m ztunnel_redirect.app.demo

# Rule-install latency and reconcile cost, ours vs Istio's method, in one run (minutes; as root).
bench: setup system-packages
	$(BIN)/python -m bench.run --sizes 1,100,1000 --out bench/results

# The same harness in seconds (CI runs it through tests/test_bench.py).
bench-quick: setup system-packages
	$(BIN)/python -m bench.run --quick --out bench/results/quick

# The churn soak: 10,000 pods through the real agent in waves, with restarts and faults, and leak
# accounting every 1,000 (minutes; as root). SOAK_ARGS="--pods 3000" etc. to change it.
soak: setup system-packages
	$(BIN)/python -m ztunnel_redirect.testing.soak --out bench/results/soak $(SOAK_ARGS)

# The agent's image from the Dockerfile, with podman (tools/build-image says how and why).
image: system-packages
	tools/build-image

# Regenerates the protobuf code (ZDS; the CRI subset the containerd test speaks) from the .proto
# files kept in the repo.
proto: setup
	$(BIN)/python -m grpc_tools.protoc -I ztunnel_redirect/adapters \
		--python_out=ztunnel_redirect/adapters \
		--pyi_out=ztunnel_redirect/adapters ztunnel_redirect/adapters/zds.proto
	$(BIN)/python -m grpc_tools.protoc -I ztunnel_redirect/testing \
		--python_out=ztunnel_redirect/testing --pyi_out=ztunnel_redirect/testing \
		ztunnel_redirect/testing/cri.proto

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
