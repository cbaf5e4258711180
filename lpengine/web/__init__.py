"""The web console (`lpengine serve`): run, watch and review batches from a browser, on the same engine and state.

A room above `Engine`: it imports the engine, config, state store and reports, and nothing below imports it.
"""

from lpengine.web.server import Console, ConsoleSettings, create_app, open_console, serve_forever

__all__ = ["Console", "ConsoleSettings", "create_app", "open_console", "serve_forever"]
