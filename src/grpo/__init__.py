"""grpo: Group Relative Policy Optimization (Shao et al. 2024, arXiv 2402.03300) for language models."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`grpo.Environment`, `grpo.Step`, `grpo.ToolEnvironment`: the environment contract (grpo.envs), imported when
    first used, so `import grpo` stays light."""
    if name in ("Environment", "Step", "ToolEnvironment"):
        import grpo.envs

        return getattr(grpo.envs, name)
    raise AttributeError(f"module 'grpo' has no attribute {name!r}")
