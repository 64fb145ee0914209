"""alignbench's built-in methods (installed as ``alignbench_methods``). Each module is one method:
its config dataclass, its loss, its train step. They register through the ``alignbench.methods``
entry-point group in pyproject.toml, exactly as a third-party plugin package would."""
