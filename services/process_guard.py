"""No engine process outlives the actor that started it.

vLLM runs its engine in child processes (``VLLM::EngineCore``) and those start their own
(``VLLM::Worker``). When Ray ends an actor (``ray.kill``, its driver exiting, a run stopped during
start-up) it kills the actor's process and, at best, that process's direct children: the engine's
grandchildren lived on with the model in memory (~700 MB each on CPU) after the run had exited.

``guard_children`` starts a small watchdog, detached from the actor (so that killing the actor's
children does not kill it), that sleeps until the actor's process exits (a pidfd becomes
readable), then kills the actor's whole process group, which every process the engine started
belongs to (Ray makes each worker the leader of a group of its own).
"""
from __future__ import annotations

import os
import subprocess
import sys

# The watchdog: wait for the actor's exit, then kill its process group.
_WATCHDOG = r"""
import os, select, signal, sys, time
actor, group = int(sys.argv[1]), int(sys.argv[2])
try:
    select.select([os.pidfd_open(actor)], [], [])  # readable once the actor has exited
except OSError:  # no pidfd (Linux < 5.3)
    while os.path.exists(f"/proc/{actor}"):
        time.sleep(1)
try:
    os.killpg(group, signal.SIGKILL)
except ProcessLookupError:
    pass
"""

# Started by the actor, starts the watchdog in a session of its own and exits at once: the
# watchdog is then nobody's child in the actor's tree.
_DETACH = "import subprocess, sys; subprocess.Popen(sys.argv[1:], start_new_session=True)"

_guarded = False


def guard_children() -> bool:
    """Call first thing in an actor that will start child processes. Outside a Ray actor (a driver
    at a terminal) it does nothing: the driver's group is the terminal's, not the run's."""
    global _guarded
    import ray

    if _guarded or not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return False
    if os.getpgrp() != os.getpid():
        os.setpgid(0, 0)  # a group of our own, so the kill reaches our children and nothing else
    subprocess.run([sys.executable, "-c", _DETACH, sys.executable, "-c", _WATCHDOG, str(os.getpid()),
                    str(os.getpgrp())], check=True, stdin=subprocess.DEVNULL, close_fds=True)
    _guarded = True
    return True
