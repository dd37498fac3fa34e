"""Prometheus metrics of every platform process: the names and labels (metrics.py), the
store/request timers, and the scrape endpoint. Imports only prometheus-client: any layer
may record into it, none of it knows the domain."""
