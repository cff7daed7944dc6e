"""The scripts' helpers beyond the method: the benchmark's decoder runs and report, and the evaluation of a
trained model."""
