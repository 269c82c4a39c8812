"""`load_namespace_model(model_id)`: a deployed model's weights inside any Ray process.

    from modelservice_sdk.loader import load_namespace_model

    model = load_namespace_model("3f2c...")        # NamespaceModel
    model.tensors["encoder.weight"]               # read-only numpy view, zero-copy
    model.torch_state_dict()                      # torch tensors sharing that memory
    model.onnx_session() / model.torchscript_module()

Works in any Ray task, actor or driver connected to the cluster the service deploys to.
A model that is not cached yet is loaded on demand (one load however many callers ask)
and then returned. The time of a call does not grow with the model's size: the arrays
are views on the shared object store, never copies.
"""

from __future__ import annotations

import os
import time
import weakref
from typing import Any

from modelservice_sdk.model import ModelNotAvailable, NamespaceModel

CACHE_NAMESPACE = "modelservice"
DEFAULT_DATABASE = "modelservice"
CACHE_WAIT_SECONDS = 30.0
"""How long a load waits for a missing model cache to come back: every service replica
recreates a lost cache within seconds (its dependency monitor notices)."""

__all__ = ["ModelNotAvailable", "NamespaceModel", "load_namespace_model"]


def load_namespace_model(
    model_id: str,
    *,
    namespace_id: str | None = None,
    database: str | None = None,
) -> NamespaceModel:
    """The model's weights from the Ray object store, loading them first if needed.

    `model_id` is a model id, or an alias reference `"<model name>@<alias>"` (e.g.
    `"bert@production"`), which needs `namespace_id`: it resolves to the alias's current
    model at each call, so a plugin sees a blue-green switch at its next call (a model it
    already holds stays valid).
    `namespace_id`, when given, must own the model (a plugin acting for one tenant cannot
    reach another's model). `database` selects the service deployment whose cache to use
    (default: `MODELSERVICE_MONGODB_DATABASE` or "modelservice").
    Raises ModelNotAvailable for an unknown model, a foreign one, or a failed load.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address="auto", namespace=CACHE_NAMESPACE, log_to_driver=False)
    name = cache_name(database)
    key = (name, model_id, namespace_id)
    # An alias may point elsewhere at any time: only ids (immutable) are served from here.
    held = _held.get(key) if "@" not in model_id else None
    if held is not None:
        # This process still holds the model: same id, same bytes (ids are immutable). No
        # round trip; the cache hears of the use (for its LRU order) without waiting.
        _report_use(name, model_id)
        return held
    try:
        model = _load(_cache_actor(name), model_id, namespace_id)
    except ray.exceptions.RayActorError:
        # The cache was replaced (Ray restarted it, or a service replica recreated it).
        _actors.pop(name, None)
        model = _load(_cache_actor(name), model_id, namespace_id)
    if "@" not in model_id:
        _held[key] = model
    return model


def cache_name(database: str | None = None) -> str:
    """The Ray name of the model cache of the service deployment using `database`."""
    return f"model-cache-{database or os.environ.get('MODELSERVICE_MONGODB_DATABASE') or DEFAULT_DATABASE}"


_held: weakref.WeakValueDictionary[tuple[str, str, str | None], NamespaceModel] = weakref.WeakValueDictionary()
"""Models this process holds, weakly: a repeat call is served from here while the plugin
keeps the model, and once it lets go, nothing here keeps the object-store memory alive
(an undeploy or an eviction frees it as usual)."""

USE_REPORT_INTERVAL_SECONDS = 1.0
_last_reported: dict[tuple[str, str], float] = {}


def _report_use(name: str, model_id: str) -> None:
    """Tells the cache of a use, at most once a second per model, without waiting."""
    now = time.monotonic()
    if now - _last_reported.get((name, model_id), 0.0) < USE_REPORT_INTERVAL_SECONDS:
        return
    _last_reported[(name, model_id)] = now
    actor = _actors.get(name)
    touch = getattr(actor, "touch", None)  # a cache of an older release has no `touch`
    if touch is not None:
        touch.remote(model_id)


_actors: dict[str, Any] = {}
"""Cache actor handles of this process: looking one up costs a round trip to Ray's GCS."""


def _cache_actor(name: str) -> Any:
    """The cache actor's handle; waits a while for one that is being recreated.

    Plugins never create the cache themselves: it holds the service's credentials (MongoDB,
    the archive store), which are not the tenant's to have.
    """
    import ray

    if name in _actors:
        return _actors[name]
    deadline = time.monotonic() + CACHE_WAIT_SECONDS
    while True:
        try:
            _actors[name] = ray.get_actor(name, namespace=CACHE_NAMESPACE)
            return _actors[name]
        except ValueError:
            if time.monotonic() >= deadline:
                raise ModelNotAvailable(
                    f"no modelservice model cache ({name!r}) runs on this Ray cluster; is the service running?"
                ) from None
            time.sleep(0.25)


def _load(cache: Any, model_id: str, namespace_id: str | None) -> NamespaceModel:
    import ray

    # The caller's node: where a copy of the weights is zero-copy (deployed with all_nodes).
    node_id = ray.get_runtime_context().get_node_id()
    refs: list[Any] | None = ray.get(cache.lookup.remote(model_id, namespace_id, node_id))
    if refs is None:
        refs = ray.get(cache.ensure.remote(model_id, namespace_id, node_id))
    model: NamespaceModel = ray.get(refs[0])
    return model
