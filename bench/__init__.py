"""Benchmarks: this framework vs a raw tf.function loop vs Keras Model.fit.

`python -m bench.run` (or `make bench`); see bench/README.md.
"""
