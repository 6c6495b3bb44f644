"""Workload data and what is measured of it, for real and simulated runs alike: traces (public
and synthetic) and their transforms, per-request records, SLO reports, sweep summaries and
plots. A leaf library: it imports nothing of Prism but its config types, and no HTTP client."""
