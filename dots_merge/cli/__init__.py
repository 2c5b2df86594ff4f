"""The command lines: `dots-merge` (main.py) and `dots-merge-yaml` (mergekit_yaml.py). Thin: parse, call, report."""
