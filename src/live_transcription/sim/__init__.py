"""Development tools: an HPB emulator, Janus control and publishers.

Used by the tests and the demo; not part of the production service.
"""
