"""Persistence: MongoDB documents of namespaces, API keys, models and deployments."""
