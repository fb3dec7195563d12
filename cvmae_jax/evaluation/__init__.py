"""Evaluation of pretrained runs: reconstruction per lab (and, later, downstream probes)."""
