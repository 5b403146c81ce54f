"""The base models the server runs: loading a served model with the engine's attention (`loader.py`)
and building small random-init ones offline for tests, benchmarks and the toy demo (`tiny.py`)."""
