"""The exceptions of keruta-prefect, under one base (standard library only: the agent uses it too).

Every error keruta-prefect raises on purpose is a :class:`KerutaError` and says in one line what went
wrong. It is either

- :class:`TransientError`: worth another try of the same step, unchanged (an API hiccup, a dropped
  watch). The flow's launch and wait steps retry these, with backoff (its database steps retry the
  database's own OperationalError); where a whole run cannot go on (no answer to its concurrency-slot
  request) it fails with the one line, and running it again may help;
- :class:`PermanentError`: another try would fail the same way (bad settings, a refusal, forbidden).
  Nothing retries it; the person reading the line has to act.

How a *task* ended is never an exception: that is an ``Outcome`` (see ``keruta_prefect.outcomes``).
Classes keep their historical standard-library bases too (``ValueError`` for bad input, ``LookupError``
for a missing record), so ``except ValueError`` in callers still works.
"""

from __future__ import annotations


class KerutaError(Exception):
    """Base of every error keruta-prefect raises on purpose."""

    transient: bool = False


class TransientError(KerutaError):
    """Worth another try of the same step, unchanged."""

    transient = True


class PermanentError(KerutaError):
    """Another try would fail the same way; a person has to act on the message."""



def is_transient(exc: BaseException) -> bool:
    """Would another try of the same step, unchanged, help?"""
    return isinstance(exc, KerutaError) and exc.transient
