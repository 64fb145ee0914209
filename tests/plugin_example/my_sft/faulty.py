"""A method that fails mid-training: used by the fault-injection tests of a sweep."""
from alignbench.methods import Method


class Explode(Method):
    """Raises during training (fault injection)."""
    name = "explode"

    def train(self, ctx):
        raise RuntimeError("injected failure in train()")
