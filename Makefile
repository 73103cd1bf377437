# The two commands a newcomer runs: `make demo` and `make test`. Both install what they need first
# (idempotently: an installed torch is kept; without one, the CPU build torch==2.13.0 is installed).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := build/.installed-$(shell $(PYTHON) -c "import sys; print(sys.version_info[0]*100+sys.version_info[1])")
SOURCES := $(shell find csrc kernels perturbdiff -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.py' -o -name '*.toml' \)) setup.py CMakeLists.txt pyproject.toml

.PHONY: install demo test real-data bench bench-full gpu-validate clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install --no-build-isolation -e '.[test]'
	@mkdir -p build && touch $@

demo: install
	$(PYTHON) -m perturbdiff demo --out demo_out

test: install
	$(PYTHON) -m pytest -q -rs tests

bench: install
	$(PYTHON) -m perturbdiff bench --out benchmarks/out

bench-full: install
	$(PYTHON) -m pytest benchmarks --benchmark-only --benchmark-columns=median,ops,rounds -p no:cacheprovider

gpu-validate: install
	$(PYTHON) -m perturbdiff bench --gpu-validate --out gpu_results

clean:
	rm -rf build dist *.egg-info perturbdiff/_C*.so

# The README's real-data run: held-out (cell type x perturbation) groups of the shared PerturBench set.
real-data: install
	$(PYTHON) -m perturbdiff demo --out devel_out --h5ad ../shared/data/perturbench_devel.h5ad \
	    --pert-key condition --context-key cell_type --control-label control \
	    --split perturbdiff/configs/splits/perturbench_devel.toml --steps 4000
