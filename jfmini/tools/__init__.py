"""The scripts' helpers beyond the method: the benchmark's decoder runs, measurement, lossless check and
report, decode.py's prompt and display, ablate.py's variants, and the evaluation of a trained model."""
