"""The synthetic head lab: procedural identities and styles with ground truth, a generator with
PanoHead's interface, an exact exemplar prior, and the demo and benchmark built on them.

world (identities, fields, styles) -> generator (frozen field + trainable residual) -> prior
(exemplar renders of other identities) -> the unchanged trainer -> evaluate (headstyle.metrics).
"""
