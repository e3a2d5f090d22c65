"""Helpers for the CLI tests: run ``python -m fastseq`` in a subprocess."""

import os
import subprocess
import sys



REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cli(args, extra_pythonpath=None, env=None, timeout=300):
    """Run the command line in a fresh interpreter; returns CompletedProcess (text)."""
    e = dict(os.environ)
    e.update(env or {})
    e.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    paths = ([extra_pythonpath] if extra_pythonpath else []) + [REPO]
    if e.get("PYTHONPATH"):
        paths.append(e["PYTHONPATH"])
    e["PYTHONPATH"] = os.pathsep.join(paths)
    return subprocess.run([sys.executable, "-m", "fastseq"] + list(args), capture_output=True,
                          text=True, timeout=timeout, env=e, cwd=REPO)


