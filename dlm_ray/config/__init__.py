"""Typed configs for every stage (``schema``, ``inference``) and their YAML files and dotted
command-line overrides (``io``). Imports neither torch nor Ray."""
