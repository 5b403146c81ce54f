"""The HTTP layer: FastAPI routers for generation (`generate.py` native, `openai.py` OpenAI-compatible,
both through `service.py`), the admin API for adapters (`admin.py`, behind `admin_gate.py`), health
and readiness (`health.py`), with the request schemas and their bounds (`schemas.py`), JSON errors
(`errors.py`), body limits, preconditions and request ids. It talks to the engine through
`AsyncEngine`'s public methods and to adapters through the registry; it never reaches into either.
"""
