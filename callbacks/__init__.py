"""Lightning callbacks of distill: pruning, QAT, export-and-measure, target stopping."""
