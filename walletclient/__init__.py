"""The client library a service embeds: the wallet client over Temporal and the phase-aware read
router. Importable without the CLI, the dev stack or the benchmarks."""
