"""framelabel's benchmarks: figures for issue 4, not tests."""
