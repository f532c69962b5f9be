"""Built-in plugins, one module per entry point of the ``damo_plugins`` group (``setup.cfg``)."""
