"""Studies: sweeps, results store, reports, overhead benchmark."""
