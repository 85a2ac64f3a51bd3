"""Stand-in (see benchmarks/gpu/standins/README.md)."""
