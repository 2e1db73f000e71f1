#!/usr/bin/env bash
# The recipe of the shipped `default` codec, end to end. Rerun it on any Debian machine:
#   bash scripts/train_default_codec.sh
# 1. corpus from Debian packages (voices it_IT_m_Carlo and fr_CA_f_June held out: never trained on)
# 2. feature cache of the training voices
# 3. training (single-threaded: on 2 shared cores one torch thread was several times faster)
# 4. the best checkpoint, without optimizer state, becomes vqkit/assets/default.safetensors,
#    with the decoder post-filter chosen on held-out clips (benchmarks/RESULTS.md)
# 5. the bench on the held-out selection, next to Codec 2 and Opus
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
STEPS=${STEPS:-9000}

$BIN/python scripts/build_speech_corpus.py corpora/speech16k --debs corpora/debs
$BIN/vqkit prepare corpora/speech16k/train cache/speech16k --config configs/speech_rvq.toml --workers 2
OMP_NUM_THREADS=1 $BIN/vqkit train configs/speech_rvq.toml --data cache/speech16k --run runs/speech_rvq \
    --set train.steps="$STEPS" --set train.warmup_steps=300 --set train.eval_every=1000 \
    --set train.checkpoint_every=250 --set train.log_every=100 --set train.threads=1
$BIN/python scripts/ship_model.py runs/speech_rvq vqkit/assets/default.safetensors \
    --set codec.postfilter=1.15
$BIN/vqkit bench corpora/speech16k/bench --out bench-out/default --bitrates 1.25,2.5,3.2,5
