"""The `fedgate` command line."""
