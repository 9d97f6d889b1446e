"""Benchmark scripts of cpc-models (not part of the installed package). Run from the repository root:

    python -m benchmarks.run --device cpu            # -> benchmarks/results/cpu.json, cpu.md
    bash benchmarks/gpu_run.sh                       # on a CUDA machine -> cuda.json, cuda.md

See docs/benchmarks.md.
"""
