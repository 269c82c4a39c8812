"""The core: uploads, models, tenancy. Knows nothing of gRPC, REST or Envoy."""
