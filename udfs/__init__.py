"""Models and the pandas UDFs that run them (one loader per model role)."""
