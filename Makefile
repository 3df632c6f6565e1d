# vilscale: every target does its own setup on a fresh Debian/Ubuntu machine and is idempotent.
#   make setup   .venv with vilscale (editable) and its test extras, plus the system packages
#   make demo    the digits demo on CPU (the main job on the embedded default)
#   make test    the quick tier a newcomer runs (minutes): unit tests, one shared run, one resume, a detection and a
#                segmentation step, refusals, the kernels through Triton's interpreter
#   make test-full  what CI runs: the quick tier plus real Ray/SLURM/Prometheus services, the SLURM link cut on
#                two namespace hosts, fault launches, the digits-sized shipped jobs, learning runs
#   make test-extended  the long real-cluster scenarios (about an hour; not in make test-full): the other node
#                losses, requeues and restart budgets, the lab-sized shipped jobs, the bf16 learning runs
#   make test-transfer  pretraining's worth on digits segmentation and detection (about 14 min; not in make test)
#   make lint    ruff

# torch and torchvision as one matched pair: torchvision's C++ ops (nms, roi_align) must be built for the very
# torch build beside them (PyPI's torchvision next to a +cpu torch fails at torchvision::nms).
TORCH_SPEC ?= torch==2.14.1
TORCHVISION_SPEC ?= torchvision==0.29.1
# Where torch comes from, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu126" for a CUDA build.
TORCH_PIP_ARGS ?=
PYTHON ?= python3
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vilscale-installed
# ffcv and vilscale's JPEG crop decoder (libjpeg's API, vilscale/data/_cropdecode.c) compile against these;
# the integration tests start these services (iproute2: the multinode tests' network-namespace hosts).
FFCV_SYSTEM_PACKAGES := pkg-config libopencv-dev libturbojpeg0-dev libjpeg-dev
SERVICE_SYSTEM_PACKAGES := slurm-wlm munge prometheus iproute2
# What the build needs, however installed (OS packages, conda-forge, environment modules): found by pkg-config.
BUILD_PKGCONFIG := opencv4 libturbojpeg libjpeg
PYTEST_ARGS ?=

# One ninja on PATH (the venv's): DeepSpeed rebuilds its JIT op whenever the ninja it finds changes.
export PATH := $(VENV)/bin:$(PATH)
export RAY_TRAIN_ENABLE_PRINT_PATCH := 0

.PHONY: setup system-packages demo test test-full test-transfer test-extended lint clean

# The quick tier: what is not slow (nor needs services, hosts or injected faults), plus the slow tests given a budget
# (tests/conftest.py fails a quick-tier test that overruns its budget).
QUICK_TIER := not (slow or integration or multinode or faults) or budget

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml Makefile
	@$(MAKE) --no-print-directory system-packages
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	# torch first (pinned), and the build-time needs of ffcv and deepspeed, which build against the
	# installed torch and numpy (with build isolation they would pull another torch build).
	$(PY) -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)" "$(TORCHVISION_SPEC)"
	$(PY) -m pip install --quiet numpy ninja pkgconfig
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test]" "$(TORCH_SPEC)" "$(TORCHVISION_SPEC)"
	$(PY) -m vilscale.orchestration.training.prebuild
	touch $(STAMP)

system-packages:
	@missing=""; for p in $(FFCV_SYSTEM_PACKAGES) $(SERVICE_SYSTEM_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing system packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  exit $$?; \
	fi; \
	if ! pkg-config --exists $(BUILD_PKGCONFIG) 2>/dev/null; then \
	  echo "vilscale's build (ffcv, the crop decoder) needs headers pkg-config does not find ($(BUILD_PKGCONFIG));"; \
	  echo "install them, then run make setup again:"; \
	  echo "  Debian/Ubuntu:   sudo apt-get install -y $(FFCV_SYSTEM_PACKAGES)"; \
	  echo "  RHEL/Rocky/Alma: sudo dnf install -y pkgconf-pkg-config opencv-devel turbojpeg-devel libjpeg-turbo-devel"; \
	  echo "  without root:    conda install -c conda-forge pkg-config opencv libjpeg-turbo  (in an active conda env)"; \
	  exit 1; \
	fi; \
	echo "note: the build headers are found; only the tests use slurm-wlm, munge, prometheus and iproute2, which are"; \
	echo "  not all installed (as root: sudo apt-get install -y $(SERVICE_SYSTEM_PACKAGES)); setup goes on without them"

demo: setup
	$(PY) -m vilscale.cli demo

test: setup
	$(VENV)/bin/ruff check vilscale tests benchmarks
	VILSCALE_TEST_TIER=quick $(VENV)/bin/pytest -m "$(QUICK_TIER)" $(PYTEST_ARGS)

test-full: setup
	$(VENV)/bin/ruff check vilscale tests benchmarks
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# the transfer tests (segmentation: six 12-epoch fine-tunes; detection: the 15-epoch demo and six 4-epoch
# Mask R-CNN fine-tunes, 7m55; about 14 min on 2 cores), left out of make test
test-transfer: setup
	$(VENV)/bin/pytest -m transfer tests/test_transfer.py -s

# the long real-cluster scenarios (node losses on two hosts, preemption, restarts that use up their budget; minutes
# each), left out of make test-full so that CI stays within its time
test-extended: setup
	$(VENV)/bin/pytest -m extended $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check vilscale tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
