#!/usr/bin/env bash
# Install agentrl from this checkout into a virtualenv, as CI does: the pinned torch first, then the project
# (editable) with its extras. .ci/run and both images (docker/Dockerfile.cpu, docker/Dockerfile.gpu) call this
# script, so an image holds exactly what CI tests.
#
#   docker/install.sh VENV
#
# VENV is created unless it exists (a virtualenv of python3). Settings, from the environment:
#   INSTALL_FIRST   requirements installed before the project (default: torch==2.13.0, the CPU build on a
#                   machine whose pip finds it; the GPU image gives SGLang and the torch it pins)
#   INSTALL_INDEX   an index URL for that first step only (the CPU image: PyTorch's CPU wheels), default none
#   INSTALL_EXTRAS  the project's extras (default: the ones CI installs)
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 VENV   (INSTALL_FIRST, INSTALL_INDEX, INSTALL_EXTRAS from the environment)" >&2
    exit 2
fi
venv=$1
root=$(cd "$(dirname "$0")/.." && pwd)
first=${INSTALL_FIRST:-torch==2.13.0}
extras=${INSTALL_EXTRAS:-test,dev,data,plots,megatron,engine,kernel,tracking,docs}

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
# shellcheck disable=SC2086  # INSTALL_FIRST is a list of requirements
"$py" -m pip install -q ${INSTALL_INDEX:+--index-url "$INSTALL_INDEX"} $first
"$py" -m pip install -q -e "${root}[${extras}]"
"$py" -c "import agentrl, torch; print(f'agentrl installed in $venv (torch {torch.__version__})')"
