"""The Triton-free server package: settings, templating, batching, runtimes, heads, metric names and
the `reward-server` launcher. The Triton models under model_repository/ are thin adapters over it."""
