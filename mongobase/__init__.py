"""The base of every MongoDB-backed store (stores/, registries/): the client from plain
parameters, BSON encodings of money, ids and time, transaction retry."""
