"""modelservice: the gRPC service that stores and deploys custom models."""
