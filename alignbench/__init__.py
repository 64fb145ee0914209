"""alignbench: LLM alignment methods side by side on HH preference data, measured as in the
HH-RLHF paper. See README.md; the stage graph is in alignbench/stages/graph.py."""
__version__ = "0.1.0"
