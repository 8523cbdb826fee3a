"""The ground floor: loading models (``models``, ``loaders``, ``modalities``), the one reader of attention weights
(``reader``), the exact QK and OV SVDs and their null statistics (``svd``, ``lowrank``, ``nulls``, ``ov``),
extraction (``extract``), images and datasets (``images``, ``stream``, ``datasets``), the bootstrap and decision
rule (``stats``), and files, digests, provenance, messages and cluster executors.

Nothing here imports from the floors above: search, analyses, book, present.
"""
