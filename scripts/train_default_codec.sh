#!/usr/bin/env bash
# The recipe of the two shipped codecs, `default` (16 kHz) and `narrowband` (8 kHz), end to end.
# Rerun it on any Debian machine:
#   bash scripts/train_default_codec.sh
# 1. corpus from Debian packages (voices it_IT_m_Carlo and fr_CA_f_June held out: never trained on;
#    every language of the unseen development bench left out of the KLettres/KTuberling voices)
# 2. feature caches of the training voices: pitch-adaptive spectral envelopes at 16 and 8 kHz
#    (configs/speech_parametric.toml, configs/speech_parametric_nb.toml)
# 3. training (single-threaded: on 2 shared cores one torch thread was several times faster); the
#    default's run was extended twice, to 40,000 and then 56,000 steps, its cosine schedule
#    stretched to each new end (the learning rate rising back to 35 % and 19 % of its peak); then
#    each model is fine-tuned for 8,000 steps (--init) with its loss weighted by loudness
#    (train.loudness_weight = 0.23, the high band at full weight, a fresh schedule at 30 % of the
#    peak learning rate)
# 4. each fine-tuned best checkpoint becomes a compact model in vqkit/assets (no codebook training
#    state, the decoder in float16: the codes unchanged), with the decoder post-filter and input
#    level chosen on validation clips of the training voices, pitch and voicing coded jointly
#    (275 bit/s) and, in front of models trained on YIN's analysis, the pitch tracker
#    (features.pitch = "tracked")
# 5. the benches: held-out voices, unseen corpora (scripts/build_unseen_bench.py) and 8 kHz input,
#    next to Codec 2 and Opus; with PIPER_VOICE set (the path of piper's en_US-joe-medium.onnx, and
#    piper on PATH or in PIPER), also synthetic American English read sentences
#    (scripts/build_read_speech_bench.py)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
STEPS=${STEPS:-24000}
EXTEND_DEFAULT=${EXTEND_DEFAULT:-40000 56000}
FINETUNE=(--set train.steps=8000 --set train.lr=3e-4 --set train.warmup_steps=200
    --set train.loudness_weight=0.23 --set train.high_band_weight=1)
SHIP=(--compact --set codec.postfilter=1.15 --set codec.level_db=-18 --set codec.side_coding=joint
    --set features.pitch=tracked)

$BIN/python scripts/build_speech_corpus.py corpora/speech16k --debs corpora/debs
$BIN/python scripts/build_unseen_bench.py corpora/unseen --debs corpora/debs --fsdd ../shared/data/fsdd
for model in default narrowband; do
    config=configs/speech_parametric.toml
    [ "$model" = narrowband ] && config=configs/speech_parametric_nb.toml
    $BIN/vqkit prepare corpora/speech16k/train "cache/$model" --config "$config" --workers 2
    OMP_NUM_THREADS=1 $BIN/vqkit train "$config" --data "cache/$model" --run "runs/$model" \
        --set train.steps="$STEPS"
    if [ "$model" = default ]; then
        for steps in $EXTEND_DEFAULT; do
            OMP_NUM_THREADS=1 $BIN/vqkit train "$config" --data "cache/$model" --run "runs/$model" \
                --resume --set train.steps="$steps"
        done
    fi
    OMP_NUM_THREADS=1 $BIN/vqkit train "$config" --data "cache/$model" --run "runs/$model-loud" \
        --init "runs/$model" "${FINETUNE[@]}"
    $BIN/python scripts/ship_model.py "runs/$model-loud" "vqkit/assets/$model.safetensors" "${SHIP[@]}"
done
$BIN/vqkit bench corpora/speech16k/bench --out bench-out/held-out --bitrates 0.8,1.3,2.2,3.2
$BIN/vqkit bench corpora/unseen/wideband --out bench-out/unseen --bitrates 0.8,1.3,2.2,3.2
$BIN/vqkit bench corpora/unseen/narrowband --out bench-out/narrowband --bitrates 0.8,1.3,2.2,3.2
if [ -n "${PIPER_VOICE:-}" ]; then
    $BIN/python scripts/build_read_speech_bench.py corpora/read --voice "$PIPER_VOICE" --piper "${PIPER:-piper}"
    $BIN/vqkit bench corpora/read --out bench-out/read --bitrates 0.8,1.3,2.2,3.2
fi
