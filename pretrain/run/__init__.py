"""The command line and the run (segments, the in-run shrink)."""
