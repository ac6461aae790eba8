"""distill: turn a trained teacher into a small, fast, deployable student.

Importing ``distill`` is cheap: it pulls no Lightning, so ``distill.export`` stays usable
by a serving team without the training stack.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
