"""The opt-in tier that runs NCAR CREDIT's own models (installed ``miles-credit``): ``make test-credit``."""
