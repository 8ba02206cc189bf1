"""The ``tag2mask`` command line, one module per command (``main`` builds the parser); nothing outside
this package imports it. ``python -m backend.cli`` runs it.
"""
