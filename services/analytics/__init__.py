"""The analytics service: windowed statistics, correlations, benchmarks and clusters."""
