# P1 (300 steps) with the warm host before and after it ran all torch work on one thread, alternating, twice.
# OLD: git show 38184fe:trainables/warm.py > /tmp/warm_old.py; NEW: git show 5dcb763:trainables/warm.py > /tmp/warm_new.py
# OLD=/tmp/warm_old.py NEW=/tmp/warm_new.py DIR=/tmp/ab bash run.sh   (restore trainables/warm.py afterwards)
set -e
cd "$(git rev-parse --show-toplevel)"
for round in 1 2; do
  cp "$OLD" trainables/warm.py
  python -m bench.run --only p1 --p1-steps 300 --out "$DIR"/real-old-$round > "$DIR"/real-old-$round.log 2>&1
  cp "$NEW" trainables/warm.py
  python -m bench.run --only p1 --p1-steps 300 --out "$DIR"/real-new-$round > "$DIR"/real-new-$round.log 2>&1
done
