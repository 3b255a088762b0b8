"""Deploy artifacts and the container test harness (`python -m deploy.cluster`); not part of the wheel."""
