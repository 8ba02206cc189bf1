"""The HTTP service: the Flask app (routes only), its counters, and the gunicorn runner.
"""
