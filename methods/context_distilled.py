"""The context-distilled baseline π0, with no further training: the row every method is compared to."""
from __future__ import annotations

from alignbench.methods import Method, MethodConfig, PolicyArtifact


class ContextDistilled(Method):
    """π0 itself (context-distilled base LM); no training, a row in every comparison."""

    name = "context_distilled"
    config_class = MethodConfig

    def train(self, ctx) -> PolicyArtifact:
        return PolicyArtifact(path=ctx.stages.pi0.path, info={"trained": False})
