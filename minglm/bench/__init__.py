"""Benchmarks behind `python -m minglm bench <topic>`; each module has main(argv)."""
