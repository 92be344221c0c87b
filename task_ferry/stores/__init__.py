"""Progress stores: where live job snapshots and cancel requests are kept, outside the database."""
