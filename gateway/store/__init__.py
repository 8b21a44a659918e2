"""State stores: one interface (`base.StateStore`), memory and Redis."""
