# vmwipe: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml setup.py host_agent/wipe/_pages.c host_agent/snapshot/_ramwalk.c | cksum | cut -d" " -f1)

.PHONY: setup system-packages test test-fast test-debian13 test-packages kernel-matrix deb guest-images test-guest-os man completion demo bench lint abi kmod kmod-check fuzz clean

setup: system-packages $(STAMP)

system-packages:
	@bash scripts/setup-system.sh

$(STAMP): pyproject.toml setup.py host_agent/wipe/_pages.c host_agent/snapshot/_ramwalk.c
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,libvirt,chart]'
	@rm -f $(VENV)/.installed-*
	@touch $@

# pytest exits 5 when it collected nothing; that is a failure of the suite, say so.
test: setup
	@$(BIN)/pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

test-fast: setup
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

# The whole suite inside a Debian 13 (trixie) chroot in build/debian13-root (root only;
# see the script's header).  PYTEST_ARGS is passed through.
test-debian13:
	@bash scripts/test-debian13.sh

# Debian packages for this host's release in build/deb/<codename>/ (docs/packaging.md);
# `make deb SUITE=trixie` builds another release's in a cached chroot (root).
deb:
	@bash scripts/build-deb.sh $(SUITE)

# The packages installed into clean Debian 12 and 13 roots (root; minutes, roots cached
# under build/pkgroots): host package, guest package with DKMS and GRUB.
test-packages: setup
	VMWIPE_PACKAGE_TESTS=full $(BIN)/pytest tests/test_packages.py $(PYTEST_ARGS)

# vmwipe.ko on every Debian kernel series (5.10 to 7.3): fetch, build with W=1, boot under
# TCG, 3 clones (docs/kernel-matrix.md). Root (the Debian 13 root builds 6.19+ and +deb13).
# Kernels are cached in $VMWIPE_KERNEL_CACHE (default build/kernels).
# MATRIX_ARGS="--only 7.3.4+deb13-amd64 --no-boot", "--update-doc".
kernel-matrix: setup
	$(BIN)/python -m vmwipe.lab.matrix $(MATRIX_ARGS)

# Man pages (build/man/vmwipe.1 and one vmwipe-CMD.1 per command) and the bash completion
# (build/completion/vmwipe), both generated from the argparse definitions; the .deb ships them.
man: setup
	$(BIN)/python -m vmwipe.host_agent.cli.manpage build/man

completion: setup
	$(BIN)/python -m vmwipe.host_agent.cli.completion build/completion/vmwipe

# Debian 12 and 13 disk images (debootstrap, GRUB, DKMS; root only), cached in
# build/guest-images/ by a hash of their inputs: see docs/guest-images.md.
GUEST_IMAGES ?= debian12 debian13
guest-images: setup
	$(BIN)/python -m vmwipe.lab.diskimage $(GUEST_IMAGES)

# The real-guest tests on every image (`make test` runs test_guest_os.py on debian12 only;
# the libvirt domain and S3/S4 on the images, minutes per image, run here only).
test-guest-os: guest-images
	VMWIPE_GUEST_IMAGES="$(GUEST_IMAGES)" VMWIPE_GUEST_OS_TESTS=full \
	  $(BIN)/pytest tests/test_guest_os.py tests/test_guest_os_libvirt.py \
	  tests/test_guest_os_sleep.py $(PYTEST_ARGS)

demo: setup
	$(BIN)/python examples/demo.py

bench: setup
	$(BIN)/python benchmarks/run.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy -p vmwipe.protocol -p vmwipe.host_agent -p vmwipe.lab
	$(BIN)/mypy tests benchmarks
	$(BIN)/mypy examples/demo.py

abi: setup
	$(BIN)/python -m vmwipe.protocol.cheader

kmod:
	$(MAKE) -C guest_kmod

kmod-check:
	bash guest_kmod/check-builds.sh

fuzz: setup
	HYPOTHESIS_PROFILE=long $(BIN)/pytest tests -k fuzz

clean:
	$(MAKE) -C guest_kmod clean || true
	@! findmnt -rn -o TARGET | grep -q '^$(CURDIR)/build/' || \
	  { echo "make clean: mounts under build/ (a test-debian13 run?); not removing build/" >&2; exit 1; }
	rm -rf --one-file-system build host_agent/wipe/_pages.*.so host_agent/snapshot/_ramwalk.*.so
