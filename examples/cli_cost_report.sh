#!/usr/bin/env bash
# The `fxslim` command on torchvision's MobileNetV2 (random weights, nothing downloaded):
#   1. `fxslim inspect`: what each pass's matcher finds in the model (its summary line only here);
#   2. `fxslim report --passes`: the cost (MACs, energy, storage) before/after a pass, per module;
#   3. `fxslim report`: the cost per layer and by kind as an HTML page, plus a plot.
# Other formats: --format json|md|csv; `--deploy prom` counts the model as deployed with PROM.
#
# Run: bash examples/cli_cost_report.sh [OUT_DIR]    (OUT_DIR default: a new temporary directory;
# takes well under a minute). Needs `fxslim` on PATH (`make test` or `pip install -e .` installs it).
set -euo pipefail

out="${1:-$(mktemp -d)}"
mkdir -p "$out"
model=torchvision:mobilenet_v2
shape=1x3x224x224

echo "== fxslim inspect $model (summary line)"
fxslim inspect "$model" --input "$shape" | tail -n 1

echo "== fxslim report $model --passes haste:L=14: cost before/after, as a table (its totals)"
fxslim report "$model" --input "$shape" --passes haste:L=14 --format table --width 140 | sed -n '/^MACs:/,$p'

echo "== fxslim report $model: the cost per layer and by kind as an HTML page, and a plot of MACs by kind"
fxslim report "$model" --input "$shape" --format html --out "$out/mobilenet_v2.html" --plot "$out/mobilenet_v2_macs.png"
ls -l "$out"
echo "wrote $out/mobilenet_v2.html and $out/mobilenet_v2_macs.png"
