"""Counts of compiled programs that do not depend on the order the test files run in.

A test run shares one persistent compilation cache between its test processes
(``conftest.py``), so whether a program is compiled or read from that cache depends on
which tests ran before, in this process or the other. ``compilations.Compilations``
counts a program once either way.
"""

import json
import os
import subprocess
import sys
import textwrap

# A fresh process with a cache of its own: a jit of a copy of the function behind
# covariance_init's one program puts that program in the persistent cache only (as a test
# of the other test process does when it needs the same zeros first), then the empty
# state is made and its programs counted.
READ_FROM_THE_CACHE = textwrap.dedent("""
    import json, sys, types
    import jax
    import numpy as np
    jax.config.update("jax_compilation_cache_dir", sys.argv[1])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    import memedit
    from memedit import moments
    from compilations import Compilations

    f = moments._empty.__wrapped__  # a copy of it: jit caches programs by function
    same = types.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__)
    jax.jit(same, static_argnums=(0, 1))(11, np.dtype(np.float32))
    with Compilations(this_thread=True) as c:
      memedit.covariance_init(11)
    print(json.dumps(dict(count=c.count, events=c.events)))
""")


def test_a_program_read_from_the_persistent_cache_counts_once(tmp_path):
  tests = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.dirname(tests), tests, os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, "-c", READ_FROM_THE_CACHE, str(tmp_path / "cache")],
                        capture_output=True, text=True, env=env, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  # Read, not compiled: the order-dependent case is the one exercised.
  assert got["count"] == 1, got["events"]
  assert "read from the persistent cache" in got["events"][0], got["events"]
