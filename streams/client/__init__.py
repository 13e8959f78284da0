"""The client library: :class:`Client`, :class:`AsyncClient` and their private parts.

Applications import these from :mod:`dspex`; the ``_``-prefixed modules here are
private to this package.
"""
