# Wait for a run started with setsid until it finishes or $1 seconds pass, copying its logs to $OUT as they grow.
T=${1:-560}
while [ ! -f /tmp/r/ALLDONE ] && [ $SECONDS -lt $T ]; do cp -r /tmp/r "$OUT"/ 2>/dev/null; sleep 5; done
cp -r /tmp/r "$OUT"/ 2>/dev/null; tail -n 2 /tmp/r/train.log | cut -c1-300; cat /tmp/r/driver.log
