# Entry points. `make test` runs every test from nothing; `make lab` provisions the
# container lab with site.yml. See README.md.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV      := .venv
BIN       := $(VENV)/bin
# The image tag follows the build script, so editing the script rebuilds the image.
TEST_IMAGE ?= pgbackup-test:$(shell sha256sum scripts/build-test-image.sh | cut -c1-12)
export TEST_IMAGE
export PATH := $(CURDIR)/$(BIN):$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
PLAYBOOKS := site.yml $(wildcard playbooks/*.yml)
SCENARIOS := $(filter-out _shared lab,$(notdir $(wildcard molecule/*)))

.PHONY: help deps venv docker image prepare lint unit molecule test lab lab-destroy bench keygen clean

help:
	@echo "make test         every test: lint, unit, molecule (installs what it needs)"
	@echo "make lab          provision the container lab with site.yml"
	@echo "make lab-destroy  remove the lab containers"
	@echo "make lint|unit|molecule  one stage; make bench  the benchmarks"
	@echo "make keygen KEY=path  a new key pair: KEY (private, the vault) and KEY.pub (backup_recipients)"

deps:
	@scripts/install-deps.sh

$(BIN)/.installed: requirements.txt
	@test -x $(BIN)/python || python3 -m venv $(VENV)
	@$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	@touch $@

venv: $(BIN)/.installed

docker: deps
	@scripts/dockerd.sh start

image: docker
	@docker image inspect $(TEST_IMAGE) >/dev/null 2>&1 || scripts/build-test-image.sh

prepare: deps venv image

lint: venv
	yamllint --strict .
	ansible-lint --profile production
	ruff check .
	ruff format --check .
	@for p in $(PLAYBOOKS); do \
	  ansible-playbook --syntax-check -i inventories/lab/hosts.yml $$p >/dev/null || exit 1; \
	  echo "syntax ok: $$p"; done
	ansible-playbook --syntax-check -i inventories/production/hosts.yml site.yml >/dev/null

unit: deps venv
	$(BIN)/pytest -q tests/

molecule: image venv
	@for s in $(SCENARIOS); do echo "== molecule test -s $$s"; molecule test -s $$s || exit 1; done

test:
	@scripts/run-tests.sh

lab: image venv
	molecule converge -s lab

lab-destroy: venv
	molecule destroy -s lab

bench: deps venv
	$(BIN)/python bench/backup_bench.py

# A new key pair on the controller: KEY's private key line goes to the vault
# (vault_backup_private_keys), KEY.pub's line to backup_recipients.
keygen: venv
	@test -n "$(KEY)" || { echo "usage: make keygen KEY=path/to/new.key"; exit 2; }
	@PYTHONPATH=module_utils $(BIN)/python -m pgbackup keygen --key-file "$(KEY)"

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
