"""The analyses: one module per measurement (§3-§8), each on the core and the search.

Nothing here imports the book-only code or the presentation.
"""
