"""Deployment into the Ray object store.

- `cache_actor`: the detached `ModelCache` actor that owns cached weights and drives loads
  (so both survive restarts of every service replica), a light shell around `cache_core`;
- `cache_core` / `cache_policy`: what the cache does, and what it may hold (admission, LRU);
- `load_task`: the Ray task that streams, verifies, decodes and returns a model's weights;
- `extraction` / `decoding`: the steps of that task;
- `cluster`: the service's handle on Ray.
"""
