"""Public Python surface of modelservice: a typed gRPC client, the CLI, and the plugin loader."""
