"""How each hidden check is judged, per lab: ``verify_<check>(case, outputs) -> str | None``.

These modules run only in the trusted grading process, never in a student's kernel.
"""
