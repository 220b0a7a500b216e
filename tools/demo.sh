#!/usr/bin/env bash
# The README's main command: the whole hif4fmt flow on a tiny offline Wan2.2-I2V look-alike, on CPU.
#
#   bash tools/demo.sh [OUT_DIR]        (default OUT_DIR: ./artifacts, which git ignores)
#
# 1. set-up (first run only): .venv + pip install -e ".[all]"       (tools/bootstrap.sh)
# 2. tiny random-weight base in diffusers layout                     (tools/make_tiny_wan.py)
# 3. calibrate on the bundled prompt file                            (hif4fmt calibrate)
# 4. build the compact .hif4 state + a fidelity report               (hif4fmt build)
# 5. inspect the state, verify it against the base                   (hif4fmt inspect / verify)
# 6. render BF16, W4A4, and both side by side with PSNR/SSIM         (wan-runtime generate)
# Every artifact lands in OUT_DIR; the last lines list them. Sizes below are CPU-friendly; the real
# model uses the defaults of each command (720x1280 calibration, 480x832 x 81 frames rendering).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${1:-artifacts}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

PROMPTS=${DEMO_PROMPTS:-tools/prompts/tiny_calibration.json}
NUM_PROMPTS=${DEMO_NUM_PROMPTS:-4}
CAL_SIZE=(--height 64 --width 64 --frames 9 --steps 6 --max-sequence-length 32)
RENDER_SIZE=(--height 128 --width 128 --frames 17 --steps 10 --max-sequence-length 32 --fps 8)
PROMPT=${DEMO_PROMPT:-"a red dragon flies over a mountain lake at sunset, cinematic"}

step() { printf '\n== %s\n' "$*"; }

step "set-up (.venv, editable install; skipped when done)"
bash tools/bootstrap.sh
PY="$ROOT/.venv/bin/python"
echo "codec: $("$PY" -m hif4fmt.codec.kernel)"
HIF4FMT=("$PY" -m hif4fmt)
WAN_RUNTIME=("$PY" -m wan_runtime)

step "tiny base: $OUT/tiny-wan"
rm -rf "$OUT/tiny-wan"
"$PY" tools/make_tiny_wan.py "$OUT/tiny-wan" --seed 0

step "calibrate on $PROMPTS (first $NUM_PROMPTS prompts)"
"${HIF4FMT[@]}" calibrate --base "$OUT/tiny-wan" --prompts "$PROMPTS" --num-prompts "$NUM_PROMPTS" \
  "${CAL_SIZE[@]}" --device cpu --no-progress --force --out "$OUT/tiny-stats.safetensors"

step "build the .hif4 state"
"${HIF4FMT[@]}" build --base "$OUT/tiny-wan" --stats "$OUT/tiny-stats.safetensors" --out "$OUT/tiny.hif4" \
  --report "$OUT/tiny-report.json" --no-progress --force

step "inspect"
"${HIF4FMT[@]}" inspect "$OUT/tiny.hif4"

step "verify against the base"
"${HIF4FMT[@]}" verify "$OUT/tiny.hif4" --base "$OUT/tiny-wan"

step "render BF16"
"${WAN_RUNTIME[@]}" generate --base "$OUT/tiny-wan" --prompt "$PROMPT" "${RENDER_SIZE[@]}" --no-progress \
  --force --out "$OUT/video-bf16.mp4"

step "render W4A4 (base + state)"
"${WAN_RUNTIME[@]}" generate --base "$OUT/tiny-wan" --state "$OUT/tiny.hif4" --prompt "$PROMPT" \
  "${RENDER_SIZE[@]}" --no-progress --force --out "$OUT/video-w4a4.mp4"

step "compare BF16 (left) with W4A4 (right)"
"${WAN_RUNTIME[@]}" generate --base "$OUT/tiny-wan" --state "$OUT/tiny.hif4" --prompt "$PROMPT" \
  "${RENDER_SIZE[@]}" --no-progress --compare --force --out "$OUT/compare.mp4" --json > "$OUT/compare.json"
"$PY" - "$OUT/compare.json" <<'EOF'
import json, sys
summary = json.load(open(sys.argv[1]))["compare"]
print("frame  PSNR dB  SSIM")
for index, (psnr, ssim) in enumerate(zip(summary["psnr_db"], summary["ssim"])):
    print(f"{index:5d}  {'inf' if psnr is None else f'{psnr:7.2f}'}  {ssim:.4f}")
mean = summary["mean_psnr_db"]
print(f"mean PSNR {'inf' if mean is None else f'{mean:.2f}'} dB, mean SSIM {summary['mean_ssim']:.4f}")
EOF

step "artifacts"
cat <<EOF
base checkpoint       $OUT/tiny-wan/
calibration stats     $OUT/tiny-stats.safetensors
PTQ state (.hif4)     $OUT/tiny.hif4   ($(wc -c < "$OUT/tiny.hif4") bytes)
build report          $OUT/tiny-report.json
BF16 video            $OUT/video-bf16.mp4  $OUT/video-bf16.gif
W4A4 video            $OUT/video-w4a4.mp4  $OUT/video-w4a4.gif
comparison            $OUT/compare.mp4  $OUT/compare.gif  (BF16 left, W4A4 right)
                      $OUT/compare.bf16.mp4  $OUT/compare.w4a4.mp4  (and their .gif)
comparison metrics    $OUT/compare.json
EOF
