"""The package version, in a module of its own so that writers can stamp it without
importing the package face (``dicompipe/__init__.py``).

Example::

    >>> from dicompipe._version import __version__
"""
__version__ = "0.1.0"
