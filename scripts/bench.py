"""Run the mmfusion benchmark suite (see mmfusion/bench.py); run it from the repository root so that
docs/BENCHMARKS.md is updated in place."""

from mmfusion.bench import main

if __name__ == "__main__":
    main()
