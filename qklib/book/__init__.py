"""The book-only code: the chapters' declared parameters and inputs (`chapter`), the claims ledger
(`ledger`) and the paper's model table (`paper_models`).

It sits above the analyses and below the presentation, which draws the ledger's verdicts.
"""
