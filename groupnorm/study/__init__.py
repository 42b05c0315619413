"""The paper's batch-size study: BN's error grows as the per-worker batch shrinks, GN's does not.

``data`` loads images as tensors, ``models`` builds ResNets with an injected norm, ``train`` runs
one (norm, batch, seed) training run, ``runner`` runs the grid with records, resume and a lock,
``report`` writes the table, figures and verdict, ``cli`` is ``groupnorm study``.
"""
