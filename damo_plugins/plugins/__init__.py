"""Built-in plugins, registered through the ``damo_plugins`` entry-point group."""
