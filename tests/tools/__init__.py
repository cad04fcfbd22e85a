"""Developer tools that produce test data (run as ``python -m tests.tools.X``)."""
