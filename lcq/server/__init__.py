"""OpenAI-compatible HTTP server over one AsyncEngine: `create_app(engine or config, settings)` and `lcq serve`.

Routes: POST /v1/completions, POST /v1/chat/completions (both stream over SSE), GET /v1/models, GET /health,
GET /metrics (Prometheus, `lcq:` prefix), POST /tokenize, POST /detokenize, GET /version, GET /openapi.json.
"""
