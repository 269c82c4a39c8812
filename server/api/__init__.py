"""The gRPC adapter: converts requests to core calls and core results to responses."""
