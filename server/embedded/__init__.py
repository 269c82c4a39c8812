"""Embedded defaults: servers the service (and the tests) start as child processes."""
