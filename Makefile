# smtp-service: `make run` starts the service, `make test` runs every test, `make postman` runs
# the Postman collection against the service `make run` started.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
NEWMAN := node_modules/.bin/newman

.PHONY: run test lint postman bench bench-deps browser-deps soak clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt | $(PY)
	$(PIP) install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(DEV_STAMP): requirements.txt requirements-dev.txt | $(PY)
	$(PIP) install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@ $(STAMP)

$(NEWMAN): package.json
	npm install --no-audit --no-fund --loglevel=error
	touch $@

# .env is made once from .env.example, with a random JWT secret for this machine.
.env:
	sed "s/^JWT_SECRET_KEY=.*/JWT_SECRET_KEY=$$($(PYTHON) -c 'import secrets; print(secrets.token_hex(32))')/" .env.example > .env
	chmod 600 .env

run: $(STAMP) .env
	$(VENV)/bin/gunicorn -c gunicorn.conf.py wsgi:app

# The README's Postman collection and environment with newman, against `make run` (on BIND, or
# BASE_URL), jwtSecret taken from .env.
BASE_URL ?= http://$(or $(BIND),127.0.0.1:8000)
postman: $(NEWMAN)
	@test -f .env || { echo "no .env: start the service with make run first"; exit 1; }
	$(NEWMAN) run postman/smtp-service.postman_collection.json \
		-e postman/local.postman_environment.json --env-var baseUrl=$(BASE_URL) \
		--env-var "jwtSecret=$$(sed -n 's/^JWT_SECRET_KEY=//p' .env)"

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .

test: $(DEV_STAMP) $(NEWMAN) browser-deps
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

bench: $(DEV_STAMP)
	$(PY) bench/send_throughput.py

# Postfix's smtp-sink for bench/compare.py, without configuring or starting a mail system.
bench-deps:
	apt-get update
	echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
	DEBIAN_FRONTEND=noninteractive apt-get install -y postfix
	systemctl disable --now postfix >/dev/null 2>&1 || true
	if postfix status >/dev/null 2>&1; then postfix stop; fi

# Debian's chromium for the end-to-end test of the documentation page (tests/e2e/test_docs_page.py).
# Installed only where it is missing and apt-get can be used (root); elsewhere that test skips
# with a one-line reason, and `make test` goes on.
browser-deps:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
		|| echo "browser-deps: chromium could not be installed; the docs page test will skip"; \
	else echo "browser-deps: /usr/bin/chromium is missing and apt-get needs root; the docs page test will skip"; fi

soak: $(DEV_STAMP)
	$(PY) bench/soak.py

clean:
	rm -rf $(VENV) node_modules .pytest_cache .ruff_cache
