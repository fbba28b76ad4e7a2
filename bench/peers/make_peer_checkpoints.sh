#!/usr/bin/env bash
# Make the peer checkpoints lowbit's readers are checked against, and each peer's own logits check.
#
# usage: bash bench/peers/make_peer_checkpoints.sh [REPO_ROOT] [NAME ...]
#   REPO_ROOT (default: git top level of cwd) must hold the peer venvs (bench/setup_peers.sh llmc gptq)
#   and lowbit's .venv; NAMEs pick a subset of the checkpoints below (default: all).
# Output: REPO_ROOT/bench/out/peers/ (git-ignored)
#   inputs/                       calib.npy (16 x 256, lowbit's calibration windows), eval_ids.npy
#                                 (first 64 tokens of wiki-evaluation), model_dir.txt
#   <name>/                       the checkpoint (config.json, model.safetensors, tokenizer) +
#   <name>/peer.json              tool, versions, config, command, and `peer_check` (merged in by
#                                 load_check.py: loader, kernel, logits summary, top-1/KL vs float)
#   <name>/peer_check/            logits.npy (1, 64, 49152) float32, dequant.safetensors, load_check.json
# A checkpoint whose directory exists is not remade (delete it to redo); its check is rerun.
set -euo pipefail
root="${1:-$(git rev-parse --show-toplevel)}"
root="$(cd "$root" && pwd)"
shift || true
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$root/bench/out/peers"
LLMC="$root/bench/.venv-llmc/bin/python"
GPTQ="$root/bench/.venv-gptq/bin/python"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

mkdir -p "$out"
if [[ ! -f "$out/inputs/eval_ids.npy" ]]; then
    PYTHONPATH="$root/src" nice -n 10 "$root/.venv/bin/python" "$here/peer_inputs.py" --out "$out/inputs"
fi
I="$out/inputs"
M="$(cat "$I/model_dir.txt")"

# name | venv that makes it | maker command (args after the script) | format | venv that checks it
CHECKPOINTS=(
  "llmc-w4a16-g64-sym|$LLMC|llmc_export.py --scheme w4a16-g64-sym|compressed-tensors|$LLMC"
  "llmc-w4a16-g64-asym|$LLMC|llmc_export.py --scheme w4a16-g64-asym|compressed-tensors|$LLMC"
  "llmc-w8a8|$LLMC|llmc_export.py --scheme w8a8|compressed-tensors|$LLMC"
  "autoround-gptq-w4g64-sym-rtn|$LLMC|autoround_export.py --format auto_gptq --iters 0|gptq|$GPTQ"
  "autoround-gptq-w4g64-asym-rtn|$LLMC|autoround_export.py --format auto_gptq --asym --iters 0|gptq|$GPTQ"
  "autoround-awq-w4g64-rtn|$LLMC|autoround_export.py --format auto_awq --iters 0|awq|$GPTQ"
  "autoround-gptq-w4g64-sym-iters20|$LLMC|autoround_export.py --format auto_gptq --iters 20|gptq|$GPTQ"
  "gptqmodel-w4g64-sym|$GPTQ|gptqmodel_export.py|gptq|$GPTQ"
  "gptqmodel-w4g64-sym-descact|$GPTQ|gptqmodel_export.py --desc-act|gptq|$GPTQ"
)

want=("$@")
for row in "${CHECKPOINTS[@]}"; do
    IFS='|' read -r name maker cmd fmt checker <<< "$row"
    if (( ${#want[@]} )) && [[ ! " ${want[*]} " == *" $name "* ]]; then continue; fi
    read -r script args <<< "$cmd"
    if [[ ! -f "$out/$name/config.json" ]]; then
        echo "== make $name" >&2
        # shellcheck disable=SC2086
        nice -n 10 "$maker" "$here/$script" --model-dir "$M" --calib "$I/calib.npy" $args --out "$out/$name"
    fi
    echo "== check $name ($fmt)" >&2
    nice -n 10 "$checker" "$here/load_check.py" --dir "$out/$name" --format "$fmt" --ids "$I/eval_ids.npy" \
        --out "$out/$name/peer_check" --float-dir "$M" --annotate "$out/$name/peer.json"
done
