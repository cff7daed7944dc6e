# Wait for run.sh until it finishes or $1 seconds pass; copy its logs to $OUT.
T=${1:-560}
while [ ! -f /tmp/r/ALLDONE ] && [ $SECONDS -lt $T ]; do sleep 5; done
cp -r /tmp/r "$OUT"/ 2>/dev/null; tail -n 2 /tmp/r/train.log | cut -c1-300; cat /tmp/r/driver.log
