"""The `mmfusion` command line: sub-commands built from typed functions."""
