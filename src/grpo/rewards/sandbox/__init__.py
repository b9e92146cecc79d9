"""Run untrusted Python (a model's completion) in a separate, limited process, and judge it from outside.

- jail.py: the process and its protections (a uid of its own, namespaces, a private root, rlimits, a
  cgroup, a timeout), `run_python`, `capabilities()`;
- view.py: what the program sees of the filesystem (the system's trees only);
- cases.py: `run_tests`, judging a solution against test cases from outside its process;
- programs/: the programs that run inside the sandbox (the boot script, the solution's server, the
  judge, and the protocol and data form they share with the trainer), real files shipped into each run.
"""

from grpo.rewards.sandbox.cases import CaseResult, parse_python, parse_tests, run_tests
from grpo.rewards.sandbox.jail import (
    FALLBACK_CAPS,
    Limits,
    SandboxResult,
    capabilities,
    run_python,
    sandbox_python,
    set_max_concurrency,
)

__all__ = ["FALLBACK_CAPS", "CaseResult", "Limits", "SandboxResult", "capabilities", "parse_python", "parse_tests",
           "run_python", "run_tests", "sandbox_python", "set_max_concurrency"]
