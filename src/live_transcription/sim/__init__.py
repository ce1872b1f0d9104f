"""Development tools: an HPB emulator and publishers, used by tests and the demo. Not for production."""
