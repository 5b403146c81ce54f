"""Adapter training: fit ReFT adapters on the served model with plain transformers and torch.

`trainer.py` fits one adapter (`train_adapter`) through the same step plan the engine serves with
(`server.reft.batch_edit`), so what is trained is exactly what is served; `modules.py` holds the
trainable parameters, made from the intervention type table; `data.py` reads examples;
`evaluate.py` checks a trained adapter the way the server serves it (greedy, the reference
generator); `provenance.py` records how it was made; `cli.py` is `reft-server train`.
"""
