#!/usr/bin/env bash
# The recipe of the shipped `default` codec, end to end. Rerun it on any Debian machine:
#   bash scripts/train_default_codec.sh
# 1. corpus from Debian packages (voices it_IT_m_Carlo and fr_CA_f_June held out: never trained on)
# 2. feature cache of the training voices: pitch-adaptive spectral envelopes (configs/speech_parametric.toml)
# 3. training (single-threaded: on 2 shared cores one torch thread was several times faster)
# 4. the best checkpoint, without optimizer state, becomes vqkit/assets/default.safetensors, with the
#    decoder post-filter and input level chosen on validation clips of the training voices
#    (benchmarks/RESULTS.md)
# 5. the bench on the held-out selection, next to Codec 2 and Opus
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
STEPS=${STEPS:-12000}

$BIN/python scripts/build_speech_corpus.py corpora/speech16k --debs corpora/debs
$BIN/vqkit prepare corpora/speech16k/train cache/envelope16k --config configs/speech_parametric.toml --workers 2
OMP_NUM_THREADS=1 $BIN/vqkit train configs/speech_parametric.toml --data cache/envelope16k \
    --run runs/parametric --set train.steps="$STEPS"
$BIN/python scripts/ship_model.py runs/parametric vqkit/assets/default.safetensors \
    --set codec.postfilter=1.15 --set codec.level_db=-18
$BIN/vqkit bench corpora/speech16k/bench --out bench-out/default --bitrates 0.7,1.3,2.2,3.2,3.5
