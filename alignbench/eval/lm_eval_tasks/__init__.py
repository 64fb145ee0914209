"""lm-eval YAML task definitions (local_*) and their loaders (utils.py) for alignbench."""
