"""Stand-in of flash-kmeans for the CPU dry run (see benchmarks/gpu/standins/README.md)."""
__version__ = "0.3.1-stand-in"
