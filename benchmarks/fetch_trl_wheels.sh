#!/usr/bin/env bash
# Download TRL and the packages it needs that the H200 image and the devkit lack, as Python 3.12
# manylinux x86_64 wheels, into the git-ignored .whl/ folder (carried to the device with carry [".whl"]).
# Run here (needs PyPI), from anywhere:  bash benchmarks/fetch_trl_wheels.sh
#
# Why these:
#   trl 1.16.0        requires transformers>=4.56.2 (no upper bound): runs with the devkit's 5.12.1;
#                     accelerate>=1.10.1 (image: 1.15.0), pandas, pyarrow>=21, psutil, jinja2, pyyaml,
#                     numpy, huggingface_hub>=0.34 (image: 1.33.0) are in the image
#   datasets 5.2.0    trl needs datasets>=4.7.0; not in the image. Its needs: dill<0.4.2 (devkit: 0.4.1),
#                     multiprocess<0.70.20, fsspec<=2026.9.0, pyarrow>=24, huggingface-hub>=1.31,<3, xxhash
#   multiprocess 0.70.19, fsspec 2026.9.0   (pinned to datasets' bounds; xxhash, pyarrow are in the image)
# On the device they go to their own folder, /tmp/site_trl, ahead of the devkit's /tmp/site
# (benchmarks/run_all_h200.sh does it):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_trl .whl/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
mkdir -p "$DEST"
git check-ignore -q "$DEST/x.whl" || { echo "fetch_trl_wheels: $DEST/ is not git-ignored (add /.whl/ to .gitignore)" >&2; exit 2; }
PY=${PYTHON:-python3}
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
PINS=(trl==1.16.0 datasets==5.2.0 multiprocess==0.70.19 fsspec==2026.9.0)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
  -d "$DEST" "${PINS[@]}"
# exactly one wheel per pinned name (two versions of one package stop the whole install)
for pin in "${PINS[@]}"; do
  name=${pin%%==*}; ver=${pin##*==}
  n=$(ls "$DEST" | grep -ci "^${name//-/_}-" || true)
  [ "$n" = 1 ] || { echo "fetch_trl_wheels: $n wheels for $name in $DEST (want 1: $ver)" >&2; ls "$DEST" >&2; exit 3; }
done
echo "fetch_trl_wheels: wheels in $DEST:"
ls -l "$DEST"/*.whl | awk '{printf "  %9d  %s\n", $5, $NF}'
total=$(cat "$DEST"/*.whl | wc -c)
echo "fetch_trl_wheels: total $total bytes ($(( total / 1024 )) KiB)"
for w in "$DEST"/trl-*.whl "$DEST"/datasets-*.whl; do
  echo "  $(basename "$w") requires:"; unzip -p "$w" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^/    /'
done
