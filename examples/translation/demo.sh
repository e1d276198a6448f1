#!/usr/bin/env bash
# Interim main job (`make demo`): train a tiny MoE translation model on a generated toy corpus,
# translate the test set with beam search, score BLEU with sacrebleu. The translation-example
# issue replaces the toy corpus with real multilingual data.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
OUT=${OUT:-results/demo}
MAX_UPDATE=${MAX_UPDATE:-400}
rm -rf "$OUT" && mkdir -p "$OUT"

echo "== 1/4 corpus: $OUT/raw"
"$PY" scripts/make_toy_corpus.py "$OUT/raw"

echo "== 2/4 binarise: $OUT/data-bin"
"$BIN/fairseq-preprocess" --source-lang src --target-lang tgt --joined-dictionary \
    --trainpref "$OUT/raw/train" --validpref "$OUT/raw/valid" --testpref "$OUT/raw/test" \
    --destdir "$OUT/data-bin" --workers 1 > "$OUT/preprocess.log" 2>&1

echo "== 3/4 train moe_transformer_tiny for $MAX_UPDATE updates (log: $OUT/train.log)"
"$BIN/fairseq-train" "$OUT/data-bin" --user-dir fairseq_moe_plugin \
    --arch moe_transformer_tiny --encoder-moe-freq 1 --decoder-moe-freq 1 \
    --moe-expert-count 4 --moe-top-k 2 \
    --criterion label_smoothed_cross_entropy_moe --label-smoothing 0.1 \
    --optimizer adam --lr 0.003 --lr-scheduler inverse_sqrt --warmup-updates 50 \
    --max-tokens 2000 --max-update "$MAX_UPDATE" --seed 1 --no-epoch-checkpoints \
    --log-format simple --log-interval 50 --save-dir "$OUT/checkpoints" 2>&1 \
    | tee "$OUT/train.log" | grep --line-buffered -E "\| (train|valid) \|" || true
test -f "$OUT/checkpoints/checkpoint_best.pt" || { echo "training failed: see $OUT/train.log"; exit 1; }

echo "== 4/4 translate the test set (beam 5) and score"
"$BIN/fairseq-generate" "$OUT/data-bin" --user-dir fairseq_moe_plugin \
    --path "$OUT/checkpoints/checkpoint_best.pt" --beam 5 --batch-size 64 \
    --scoring sacrebleu --gen-subset test > "$OUT/generate.out" 2> "$OUT/generate.log"
grep -P "^H-" "$OUT/generate.out" | sort -t- -k2 -n | cut -f3 > "$OUT/hyp.txt"
grep -P "^T-" "$OUT/generate.out" | sort -t- -k2 -n | cut -f2 > "$OUT/ref.txt"
"$BIN/sacrebleu" "$OUT/ref.txt" -i "$OUT/hyp.txt" -m bleu chrf -f text | tee "$OUT/scores.txt"
echo "done: $OUT (checkpoints, generate.out, scores.txt)"
