"""The scripts' helpers beyond the method: the benchmark's decoder runs and its report."""
