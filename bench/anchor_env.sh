#!/usr/bin/env bash
# Sourced by the GPU scripts: install the carried anchor wheels (.anchors/wheels: torch add-ons and
# DeepSpeed, built without its compiled ops) into /tmp/site and put it on PYTHONPATH.
install_anchors() {
  local wheels=${1:-.anchors/wheels}
  python3 -m pip install -q --no-index --no-deps --target /tmp/site "$wheels"/*.whl >/dev/null 2>&1
  mkdir -p /tmp/ds && tar xzf "$wheels"/deepspeed-0.19.8.tar.gz -C /tmp/ds && \
    (cd /tmp/ds/deepspeed-0.19.8 && DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . >/dev/null 2>&1)
  export PYTHONPATH=/tmp/site
}
