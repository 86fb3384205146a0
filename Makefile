# Two entry points for a fresh machine: `make demo` and `make test`. Each does its own set-up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= emoji
RUN ?= runs/demo-$(DATA)
FONT ?=
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-all setup font bench rival-env bench-rival clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP) font

# The emoji source renders Debian's Noto Color Emoji font. Install it where we can; say so where we cannot.
font:
	@if fc-list 2>/dev/null | grep -qi 'NotoColorEmoji' || test -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -q && apt-get install -y -q fonts-noto-color-emoji) >/dev/null 2>&1 \
		|| echo "note: could not install fonts-noto-color-emoji; the emoji source needs it (or make demo FONT=PATH)"; \
	else echo "note: install the emoji font with 'sudo apt-get install fonts-noto-color-emoji' (or make demo FONT=PATH)"; fi

demo: setup
	$(BIN)/dalle demo --data $(DATA) --run $(RUN) $(if $(FONT),--font $(FONT))

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

bench: $(STAMP)
	$(BIN)/python -m benchmarks

# The rival (DALLE-pytorch 1.6.6) for `python -m benchmarks --rival`: its own venv on top of ours (same torch).
RIVAL_VENV := .venv-rival
$(RIVAL_VENV)/.installed: $(STAMP) benchmarks/rival-requirements.txt
	test -x $(RIVAL_VENV)/bin/python || $(BIN)/python -m venv $(RIVAL_VENV)
	echo "import site; site.addsitedir('$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')')" \
		> "$$($(RIVAL_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/dallecli-venv.pth"
	$(RIVAL_VENV)/bin/python -m pip install -q --no-deps -r benchmarks/rival-requirements.txt
	$(RIVAL_VENV)/bin/python -c "import warnings; warnings.simplefilter('ignore'); import dalle_pytorch, dallecli"
	touch $@

rival-env: $(RIVAL_VENV)/.installed

bench-rival: rival-env
	$(RIVAL_VENV)/bin/python -m benchmarks --rival

clean:
	rm -rf $(VENV) $(RIVAL_VENV) runs .pytest_cache
