"""repld's pure core: versions, records, reconcile rules and sync planning. No I/O here."""
