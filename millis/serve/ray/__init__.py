"""`millis serve --replicas N` / `--autoscale MIN:MAX` / `--ray-address`: the same server as a Ray Serve
application (deploy.py), with cache-aware routing for generation (router.py). Ray is an optional extra
(`millis[ray]`); nothing here is imported by the single-process server."""
