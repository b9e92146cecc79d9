"""Multi-turn environments: the contract and registry (base), the tool environment (tools), the built-ins.

See grpo.envs.base for the contract (`Environment`, `Step`) and how a config names an environment,
grpo.envs.tools for tools as plain functions, and calculator / guess_number / python_tool for the built-ins.
"""

from grpo.envs.base import (
    ENVIRONMENTS,
    Environment,
    EnvironmentLoadError,
    Step,
    check_environment_args,
    load_environment,
    register_environment,
)
from grpo.envs.tools import ToolEnvironment, load_tools
from grpo.envs import calculator as _calculator  # noqa: F401  (registers the built-ins)
from grpo.envs import guess_number as _guess_number  # noqa: F401
from grpo.envs import python_tool as _python_tool  # noqa: F401
from grpo.envs.guess_number import guess_number_rows

__all__ = [
    "ENVIRONMENTS", "Environment", "EnvironmentLoadError", "Step", "ToolEnvironment", "check_environment_args",
    "guess_number_rows", "load_environment", "load_tools", "register_environment",
]
