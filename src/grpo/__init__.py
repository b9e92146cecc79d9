"""grpo: Group Relative Policy Optimization (Shao et al. 2024, arXiv 2402.03300) for language models."""

__version__ = "0.1.0"
