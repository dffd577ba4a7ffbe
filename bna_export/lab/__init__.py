"""Experiment fixtures, not the product: backdoor attacks, small reference classifiers, seeded
synthetic data and poisoned-model scenarios that the tests, the demo and the benchmarks build
and then defend. Nothing in the rest of the package imports from here."""
