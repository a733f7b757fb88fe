"""An OpenAI-compatible server for a published bundle, where each request picks its adapter.

- protocol.py: request and response bodies (OpenAI's shapes);
- the engine (``phi_pipeline.runtime.engine``): the one thread that owns the model and interleaves
  requests round-robin, swappable without touching the HTTP side;
- app.py: FastAPI routes, authentication, errors in OpenAI's shape;
- server.py: uvicorn with a draining shutdown, `phi-pipeline serve`;
- static/index.html: the chat page at `/`; web_routes.py: the in-browser page at `/web/` (``web``).

May import: ``runtime``, ``web``, ``bundle``, ``pipeline_spec``, ``errors``.
"""
