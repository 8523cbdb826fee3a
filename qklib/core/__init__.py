"""The ground floor: loading models and images, extraction, the exact QK SVD and its statistics.

Nothing here imports an analysis or a presentation module.
"""
