"""The one exception type simcache raises for bad input."""


class SimcacheError(ValueError):
    """Bad input or an impossible request, with a one-line message that names the problem.

    The command line turns it into ``Error: <message>`` and exit status 1.
    """
