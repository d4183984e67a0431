#!/usr/bin/env bash
# Reliability soak of `launch --max-restarts`: a 2-rank CPU job while another process kill -9's a random
# rank at a random moment, KILLS times. Reports the restarts, the steps lost beyond the last checkpoint
# at each death (the steps a restart trains again; must stay below checkpoint.every), and whether the
# final per-step losses equal an uninterrupted run's bit for bit, and every row's deterministic fields
# (step, loss, lr, grad_norm, tokens, loss_scale) equal its row as text.
#   bash bench/restart_soak.sh            (KILLS=100 STEPS=3000 EVERY=10; BIN=target/release/ferrospeed)
set -u
cd "$(dirname "$0")/.."
KILLS=${KILLS:-100}; STEPS=${STEPS:-3000}; EVERY=${EVERY:-10}
BIN=${BIN:-target/release/ferrospeed}
[ -x "$BIN" ] || cargo build --release -q -p ferrospeed-cli
OUT=${OUT:-$(mktemp -d /tmp/soak.XXXX)}; mkdir -p "$OUT"
# The README's tiny config, smaller and with checkpoints every EVERY steps.
common=(--config examples/tiny.toml --set model.d_model=64 --set model.n_head=2 --set train.steps="$STEPS" --set train.global_batch=8
  --set train.micro_batch=4 --set train.warmup=10 --set train.sample_tokens=0 --set checkpoint.every="$EVERY" --set checkpoint.keep=2
  --set track.tensorboard=false)
echo "reference run ($STEPS steps)..."
$BIN launch --nproc-per-node 2 train "${common[@]}" --set track.dir="$OUT/ref" --set checkpoint.dir="$OUT/ck-ref" > "$OUT/ref.log" 2>&1 || { tail "$OUT/ref.log"; exit 1; }

echo "soak run: $KILLS kills..."
t0=$(date +%s)
$BIN launch --nproc-per-node 2 --max-restarts "$KILLS" train "${common[@]}" --set track.dir="$OUT/soak" --set checkpoint.dir="$OUT/ck-soak" \
  > "$OUT/soak.log" 2> "$OUT/soak.err" &
launcher=$!
kills=0
starts() { local c; c=$(grep -cE "resumed from .* at step|no checkpoint in .* yet" "$OUT/soak.log" 2>/dev/null); echo "${c:-0}"; }
while [ $kills -lt "$KILLS" ] && kill -0 $launcher 2>/dev/null; do
  # Each kill lands in a new attempt, after it has said where it starts from.
  for _ in $(seq 600); do [ "$(starts)" -gt $kills ] && break; kill -0 $launcher 2>/dev/null || break; sleep 0.05; done
  sleep "$(python3 -c 'import random; print(round(random.uniform(0.1, 1.5), 2))')"
  # The ranks: `ferrospeed train` processes whose parent is the launcher.
  mapfile -t ranks < <(pgrep -P $launcher -f "ferrospeed train")
  [ ${#ranks[@]} -gt 0 ] || continue
  victim=${ranks[$((RANDOM % ${#ranks[@]}))]}
  # The step the run had reached, then the kill.
  reached=$(tail -n 1 "$OUT/soak/metrics.jsonl" 2>/dev/null | python3 -c 'import json,sys; l=sys.stdin.read().strip(); print(json.loads(l)["step"] if l else 0)' 2>/dev/null || echo 0)
  if kill -9 "$victim" 2>/dev/null; then kills=$((kills + 1)); echo "$kills $victim $reached" >> "$OUT/kills.txt"; fi
done
wait $launcher; rc=$?
secs=$(( $(date +%s) - t0 ))
python3 - "$OUT" "$rc" "$secs" "$EVERY" <<'PY'
import json, re, sys, pathlib
out, rc, secs, every = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
# Numbers kept as the text the run wrote: a row rebuilt from a checkpoint must be the row as written.
rows = lambda d: [json.loads(l, parse_float=str, parse_int=str) for l in (out / d / "metrics.jsonl").read_text().splitlines()]
ref, soak = rows("ref"), rows("soak")
# Every field that does not depend on timing or memory, as text (step_ms, tokens_per_s, peak_mem_bytes do).
DETERMINISTIC = ("step", "loss", "lr", "grad_norm", "tokens", "loss_scale")
text = lambda rs: [tuple((k, r.get(k)) for k in DETERMINISTIC) for r in rs]
bits = lambda rs: [(r["step"], r["loss"]) for r in rs]
err = (out / "soak.err").read_text()
restarts = len(re.findall(r"ferrospeed launch: restart \d+ of", err))
starts = [int(s or 0) for s in re.findall(r"resumed from \S+ at step (\d+)|no checkpoint in \S+ yet", (out / "soak.log").read_text())]
resumed = starts[1:]  # where each restarted attempt began
kills = [tuple(map(int, l.split())) for l in (out / "kills.txt").read_text().splitlines()] if (out / "kills.txt").exists() else []
# Steps trained again after each death: the step reached minus the step the next attempt resumed from.
lost = [max(0, k[2] - r) for k, r in zip(kills, resumed + [None] * len(kills)) if r is not None]
result = dict(launcher_exit=rc, seconds=secs, kills=len(kills), restarts=restarts, resumes=len(resumed),
              steps=len(soak), steps_unique=len({r["step"] for r in soak}), bitwise_equal=bits(soak) == bits(ref),
              rows_textually_equal=text(soak) == text(ref),
              rows_differing=[r["step"] for r, q in zip(soak, ref) if text([r]) != text([q])][:10],
              max_steps_lost=max(lost, default=0), mean_steps_lost=round(sum(lost) / max(len(lost), 1), 2),
              checkpoint_every=every, lost_below_every=all(l < every for l in lost))
print(json.dumps(result))
(out / "result.json").write_text(json.dumps(result, indent=1))
PY
echo "outputs in $OUT"
