# Wait for results/defaults/run.sh until it finishes or $1 seconds pass, copying its logs to $OUT as they grow.
T=${1:-560}; R=${R:-/tmp/r}
while [ ! -f $R/ALLDONE ] && [ $SECONDS -lt $T ]; do cp -r $R "$OUT"/ 2>/dev/null; sleep 5; done
cp -r $R "$OUT"/ 2>/dev/null
for f in $R/*.log; do echo "== $f"; grep -E "rows/s after|done in|TPF on kept|error|Error" $f | cut -c1-300 | tail -n 5; done
cat $R/driver.log
