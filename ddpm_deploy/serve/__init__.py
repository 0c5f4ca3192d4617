"""ddpm_deploy.serve: the HTTP service with step-level batching (embedded: FastAPI + uvicorn; scaled out: Ray Serve)
and sharded, resumable bulk generation on Ray. Needs the `serve` extra (fastapi, uvicorn; ray for the Ray paths),
imported only by the functions that use it."""
