"""What each hidden check calls, per lab: ``inputs_<check>(seed)`` and ``run_<check>(fn, case)``.

These modules run inside the student's kernel. They hold no expected values and never
import the module under study.
"""
