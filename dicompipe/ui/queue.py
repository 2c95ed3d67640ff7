"""The web app's job limiter: one analysis at a time per user, a few at once in all.

One :class:`JobLimiter` lives in the server process (all browser sessions share it).
Waiting jobs are served first come, first served; a waiting or running job gives its place
back in a ``finally``, so a page that is closed or rerun (Streamlit then raises in the
script thread) leaves no zombie job behind.

Example::

    >>> limiter = JobLimiter(max_running=2)
    >>> with limiter.slot("alice", on_wait=lambda pos: print("position", pos)):
    ...     run_analysis()
"""
from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections.abc import Callable, Iterator

from dicompipe.errors import DicompipeError

MAX_JOBS_ENV = "DICOMPIPE_UI_MAX_JOBS"


class Busy(DicompipeError):
    """This user already has an analysis running or waiting."""


class JobLimiter:
    """At most ``max_running`` jobs at once; at most one per user (running or waiting)."""

    def __init__(self, max_running: int = 2):
        self.max_running = max(1, int(max_running))
        self._cond = threading.Condition()
        self._running: set[str] = set()
        self._waiting: list[tuple[int, str]] = []      # (ticket, user), first come first
        self._tickets = itertools.count(1)

    def position(self, ticket: int) -> int:
        """1-based place of a waiting ticket in the queue; 0 once it runs (or is gone)."""
        with self._cond:
            return next((i for i, (t, _) in enumerate(self._waiting, 1) if t == ticket), 0)

    def counts(self) -> tuple[int, int]:
        """``(running, waiting)``."""
        with self._cond:
            return len(self._running), len(self._waiting)

    @contextlib.contextmanager
    def slot(self, user: str, on_wait: Callable[[int], None] | None = None,
             poll: float = 1.0) -> Iterator[None]:
        """Hold a running slot for ``user`` while the block runs; wait in line before.

        ``on_wait(position)`` is called while waiting (about every ``poll`` seconds); an
        exception it raises (the page went away) ends the wait and frees the place.
        Raises :class:`Busy` when ``user`` already has a job here.
        """
        with self._cond:
            if user in self._running or any(u == user for _, u in self._waiting):
                raise Busy("You already have an analysis running or waiting: wait for it to "
                           "finish, then press Analyse again.")
            ticket = next(self._tickets)
            self._waiting.append((ticket, user))
        started = False
        try:
            while True:
                with self._cond:
                    first = self._waiting[0][0] == ticket
                    if first and len(self._running) < self.max_running:
                        self._waiting.pop(0)
                        self._running.add(user)
                        started = True
                        self._cond.notify_all()
                        break
                    pos = self.position(ticket)
                if on_wait is not None:
                    on_wait(pos)
                with self._cond:
                    self._cond.wait(timeout=poll)
            yield
        finally:
            with self._cond:
                if started:
                    self._running.discard(user)
                else:
                    self._waiting = [(t, u) for t, u in self._waiting if t != ticket]
                self._cond.notify_all()


_LIMITER: JobLimiter | None = None
_LOCK = threading.Lock()


def limiter() -> JobLimiter:
    """The server process's limiter (``$DICOMPIPE_UI_MAX_JOBS`` at once, default 2)."""
    global _LIMITER
    with _LOCK:
        if _LIMITER is None:
            try:
                n = int(os.environ.get(MAX_JOBS_ENV, "2"))
            except ValueError:
                n = 2
            _LIMITER = JobLimiter(n)
        return _LIMITER
