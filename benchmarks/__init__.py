"""The product's benchmarks, run on demand (never in CI; each has a smoke test in ``tests/test_benchmarks.py``).

Run each from the repository root as a module, for example ``.venv/bin/python -m benchmarks.quality ROOT``:

- :mod:`benchmarks.quality`: detection quality on a real dataset through the product (ingest, split, training,
  ONNX bundle, the line's scoring), optionally cross-validated by capture group, with intervals;
- :mod:`benchmarks.inspector_speed`: the line's speed: torch against onnxruntime, each stage, end to end, the
  HTTP service;
- :mod:`benchmarks.train_throughput`: training images/s per backbone and mode;
- :mod:`benchmarks.decode_resize`: decode and resize of one camera photo into the model's input;
- :mod:`benchmarks.score_memory`: peak memory and images/s of scoring a whole folder in one call.

Shared helpers live in :mod:`benchmarks.common`; figures and the commands that reproduce them in ``README.md``.
"""
