# Sourced by the GPU scripts (bench/h200.sh, bench/kernelgen_gpu.sh) from the repository root: install the
# wheels the device image lacks from .whl/ when it exists, and put the repository and their bin/ on the paths.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
