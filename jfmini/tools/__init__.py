"""The scripts' helpers, beside the method: the paper's statements written literally (paper: the references
the tests hold the fast code to) and AR decoding (ar: the oracle); the benchmark's decoder runs, measurement,
lossless check and report; decode.py's prompt and display; ablate.py's variants; train.py's flags and the
evaluation of a trained model."""
