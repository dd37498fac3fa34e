"""Configuration: environment variables to settings. Imports nothing of the project."""
