#!/usr/bin/env bash
# Creates .venv/ in this checkout and installs mergesearch with its test tools.
# torch==2.13.0 goes in first: any other spec pulls a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[test]'
echo "mergesearch is installed in .venv/"
