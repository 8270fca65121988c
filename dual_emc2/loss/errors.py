"""The one error the loss package raises for a bad estimator name or option (a ``ValueError``; on the command line it
is reported as one ``error: ...`` line with exit code 2, like every usage error of :mod:`dual_emc2.errors`)."""
from __future__ import annotations

__all__ = ["OptionError"]


class OptionError(ValueError):
    """An unknown estimator, an unknown option or a value of the wrong type or range: the message names the option
    (``loss.options.<estimator>.<key>`` in configs), what it takes and what it got.

    Example::

        raise OptionError("unknown option 'loss.options.emc2.burnin' (did you mean 'burn_in'?); allowed: ...")
    """

    exit_code = 2
