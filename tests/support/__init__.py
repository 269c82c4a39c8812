"""Helpers the tests share: model files and archives built from scratch, clients."""
