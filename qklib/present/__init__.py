"""The presentation floor: altair charts, red/cyan and mask pictures, static and live widgets, the claims
ledger's page.

Nothing below imports from here; chapters call these with the analyses' results and the ledger's verdicts.
"""
