"""The presentation floor: altair charts, red/cyan and mask pictures, static and live widgets.

Analyses never import from here; chapters call these with the analyses' results.
"""
