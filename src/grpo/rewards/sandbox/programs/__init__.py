"""The programs that run inside the sandbox, shipped into each run as files (this folder, copied).

- boot.py: the jail's first program (as root where we are): limits, namespaces, the private root, then
  exec of Python on the program (the solution's server, the judge, or run_python's own files);
- serve.py: runs the solution and answers the judge's requests about it (its names, calls, ...);
- judge.py: runs the test's own code, with the solution's names as remote proxies;
- channel.py, codec.py: the line protocol and the plain-data form they talk in (used by the trainer too).

Only the standard library, nothing of grpo: inside the sandbox this folder is the package `programs`.
"""
