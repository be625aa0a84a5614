"""Helpers for tests that kill real processes."""


def dead(pid: int) -> bool:
    """Gone, or a zombie waiting to be reaped: either way it runs nothing."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
