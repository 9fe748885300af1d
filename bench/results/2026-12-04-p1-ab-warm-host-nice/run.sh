# P1 (300 steps): the warm host at Ray's nice 15 (OLD, warm.py of 3687543) against nice 0 (NEW), alternating.
# OLD=/tmp/warm_old.py NEW=/tmp/warm_new.py DIR=... ROUNDS="1 2" bash run.sh   (restore trainables/warm.py afterwards)
set -e
cd "$(git rev-parse --show-toplevel)"
for round in ${ROUNDS:-1 2}; do
  cp "$NEW" trainables/warm.py
  python -m bench.run --only p1 --p1-steps 300 --out "$DIR"/nice0-$round > "$DIR"/nice0-$round.log 2>&1
  cp "$OLD" trainables/warm.py
  python -m bench.run --only p1 --p1-steps 300 --out "$DIR"/nice15-$round > "$DIR"/nice15-$round.log 2>&1
done
cp "$NEW" trainables/warm.py
