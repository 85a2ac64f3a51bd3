"""Stand-in of flashlib for the CPU dry run (see benchmarks/gpu/standins/README.md)."""
__version__ = "0.4.0-stand-in"
