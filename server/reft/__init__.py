"""ReFT itself, with nothing else of the server package (it imports nothing outside server.reft):
the intervention types, their formulas and the type table (`interventions.py`), what an adapter
computes (`config.py`, `positions.py`), an adapter ready to apply (`adapter.py`), and how edits
reach a model's hidden states.

The engine meets ReFT at one seam: `request_edit.py` builds one `RequestEdit` per request at submit
(its edited positions, its prefix-cache identity, the rows a chunk edits), and `plan.py` turns a
step's edited rows into batched calls that `hooks.py` applies at each decoder layer. The trainer,
the slow reference (`reference.py`) and the baselines apply the same plan to a padded batch
(`batch_edit.py`).
"""
