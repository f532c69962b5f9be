"""Model builders (registered through the ``damo_models`` hook)."""
