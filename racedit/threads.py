"""racedit.threads — one way to limit the OpenMP and BLAS threads of a call (``--threads``).

The C core's OpenMP regions and SciPy's BLAS each keep their own thread pool; threadpoolctl
limits both for the duration of a ``with`` block and restores them after.
"""
import contextlib

__all__ = ["thread_limit"]


def thread_limit(threads):
    """A context limiting the OpenMP and BLAS threads to ``threads`` (an int >= 1), or, for
    None, a context that changes nothing. ValueError for a count below 1."""
    if threads is None:
        return contextlib.nullcontext()
    if isinstance(threads, bool) or int(threads) != threads or int(threads) < 1:
        raise ValueError(f"threads: expected an integer >= 1 or None, got {threads!r}")
    from threadpoolctl import threadpool_limits

    return threadpool_limits(int(threads))
