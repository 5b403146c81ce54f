"""The ReFT core: intervention types and their formulas, what an adapter computes (config, positions),
and how interventions are applied to a model. It imports nothing else of the server package."""
