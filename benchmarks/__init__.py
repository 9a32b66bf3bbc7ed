"""mmfusion's benchmarks: `python benchmarks/bench.py` or `mmfusion bench` from a checkout."""
