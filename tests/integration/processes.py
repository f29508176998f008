"""Finding the processes of a run that a test kills."""
import psutil


def child_pids(parent_pid: int, marker: str) -> list[int]:
    """Descendants of ``parent_pid`` whose command line contains ``marker`` (Ray names its
    worker processes after the actor, e.g. ``ray::LearnerRank``)."""
    found = []
    for child in psutil.Process(parent_pid).children(recursive=True):
        try:
            if marker in " ".join(child.cmdline()):
                found.append(child.pid)
        except psutil.Error:  # exited while we looked
            pass
    return found
