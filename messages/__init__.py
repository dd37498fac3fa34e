"""Message models shared by workflows, activities and the client library, and the one translation of
walletcore errors across the Temporal boundary. No I/O: workflows import these modules."""
