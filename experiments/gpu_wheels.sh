#!/usr/bin/env bash
# Wheels for the lent GPU machine (the `device` tool): its image has torch, transformers,
# aiohttp, uvloop, msgpack, prometheus-client, rich, psutil, networkx, ... but not the serving
# stack, the planner's pulp, or this project's transformers; nothing can be fetched there.
# Run here (where pip reaches the registry) once, then name .whl in the device call's carry;
# experiments/gpu_check.sh installs them into /tmp/site when .whl/ is there.
#
#     bash experiments/gpu_wheels.sh          # -> .whl/ (~40 MB), the versions of this .venv
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
NAMES="transformers huggingface-hub tokenizers pulp fastapi starlette uvicorn httptools openai pydantic
pydantic-core typing-inspection annotated-types annotated-doc jiter sniffio anyio httpx2 httpcore2 truststore"
PINS=$("$PY" -m pip list --format=freeze 2>/dev/null | "$PY" -c "
import sys
want = {n.lower().replace('_', '-') for n in sys.argv[1].split()}
for line in sys.stdin:
    name, _, version = line.strip().partition('==')
    if name.lower().replace('_', '-') in want:
        print(f'{name}=={version}')" "$NAMES")
rm -rf .whl && mkdir -p .whl
PLAT=""
for n in 17 24 27 28 31 34; do PLAT="$PLAT --platform manylinux_2_${n}_x86_64"; done
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  $PLAT --platform manylinux2014_x86_64 --platform any -d .whl $PINS
ls .whl | sed 's/^/  /'
du -sh .whl
