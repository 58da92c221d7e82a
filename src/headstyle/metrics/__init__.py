"""Metrics of a stylised 3D head generator: identity preservation (geometry and appearance apart),
stylisation (identity-free colour/texture statistics), diversity (collapse) and multi-view consistency.
Each module's docstring defines its figures."""
