"""kubernetes-validate for every supported Kubernetes version: now the harness' own (keruta_harness.validate)."""

from keruta_harness.validate import MIN_MINOR, validate_all, versions

__all__ = ["MIN_MINOR", "validate_all", "versions"]
