"""Stand-alone tools: the benchmark and the mock upstream."""
